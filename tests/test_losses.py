"""Loss terms against hand-computed values on tiny inputs, and the properties the methods rely on."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zsbir.losses.base import LossConfigError, LossContext, build_loss_set
from zsbir.models.encoder import NORMALIZATION, EncoderOutput


def out(**tensors) -> EncoderOutput:
    return EncoderOutput(**tensors)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------- triplet
def triplet_inputs():
    sketch = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    neg = torch.tensor([[0.0, 2.0], [1.0, 0.5]])
    batch = {"label": torch.tensor([0, 1]), "neg_label": torch.tensor([1, 0])}
    outputs = {"sketch": out(embedding=sketch), "photo_pos": out(embedding=pos), "photo_neg": out(embedding=neg)}
    return batch, outputs


def test_triplet_euclidean_sampled_negative_by_hand():
    from zsbir.losses.triplet import TripletLoss

    batch, outputs = triplet_inputs()
    loss = TripletLoss(margin=1.0, distance="euclidean")(batch, outputs, LossContext())
    # row 0: d+ = 1, d- = 2 -> max(0, 1 - 2 + 1) = 0;  row 1: d+ = 1, d- = 0.5 -> 1.5
    assert float(loss) == pytest.approx(0.75, abs=1e-5)


def test_triplet_cosine_sampled_negative_by_hand():
    from zsbir.losses.triplet import TripletLoss

    batch, outputs = triplet_inputs()
    outputs["sketch"] = out(embedding=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    loss = TripletLoss(margin=0.2, distance="cosine")(batch, outputs, LossContext())
    # row 0: d+ = 1 - 1 = 0, d- = 1 - 0 = 1 -> 0;  row 1: d+ = 1 - 1/sqrt2, d- = 1 - 0.5/sqrt(1.25)
    row1 = (1 - 1 / math.sqrt(2)) - (1 - 0.5 / math.sqrt(1.25)) + 0.2
    assert float(loss) == pytest.approx(max(0.0, row1) / 2, abs=1e-6)


def test_triplet_hard_and_semihard_mining_by_hand():
    from zsbir.losses.triplet import TripletLoss

    # one anchor at 0 (class 0); photos: its positive at 1, other-class photos at 0.5, 1.5, 3.
    # A photo of the anchor's own class at 0.1 (another item's positive) must never be mined.
    batch = {"label": torch.tensor([0, 0]), "neg_label": torch.tensor([1, 2])}
    outputs = {
        "sketch": out(embedding=torch.tensor([[0.0], [10.0]])),
        "photo_pos": out(embedding=torch.tensor([[1.0], [0.1]])),
        "photo_neg": out(embedding=torch.tensor([[0.5], [1.5]])),
    }
    ctx = LossContext()
    hard = TripletLoss(margin=1.0, distance="euclidean", mining="hard")(batch, outputs, ctx)
    semi = TripletLoss(margin=1.0, distance="euclidean", mining="semihard")(batch, outputs, ctx)
    # anchor 0: d+ = 1; hard d- = 0.5 -> 1.5; semi-hard d- = 1.5 (closest farther than d+) -> 0.5
    # anchor 1 (at 10): d+ = 9.9; other-class photos at 9.5, 8.5 -> hard d- = 8.5 -> 2.4;
    #   none farther than d+ -> semi-hard falls back to the hardest -> 2.4
    assert float(hard) == pytest.approx((1.5 + 2.4) / 2, abs=1e-5)
    assert float(semi) == pytest.approx((0.5 + 2.4) / 2, abs=1e-5)


def test_triplet_rejects_bad_settings():
    from zsbir.losses.triplet import TripletLoss

    with pytest.raises(ValueError, match="loss.triplet.distance"):
        TripletLoss(distance="manhattan")
    with pytest.raises(ValueError, match="loss.triplet.margin"):
        TripletLoss(margin=-1)


# ---------------------------------------------------------------------------- ce
def test_ce_by_hand_and_views():
    from zsbir.losses.classification import ClassificationLoss

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    batch = {"label": torch.tensor([0, 1]), "neg_label": torch.tensor([1, 0])}
    outputs = {"sketch": out(embedding=logits, cls_logits=logits), "photo_pos": out(embedding=logits, cls_logits=logits)}
    value = ClassificationLoss(views=["sketch", "photo_pos"])(batch, outputs, LossContext())
    expected = -(math.log(softmax(np.array([2.0, 0.0]))[0]) + math.log(softmax(np.array([0.0, 1.0]))[1])) / 2
    assert float(value) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(LossConfigError, match="loss.ce.views"):
        ClassificationLoss(views=["drawing"])


# ---------------------------------------------------------------------------- domain_grl
def test_grl_is_identity_forward_and_scales_the_gradient_by_minus_lambda():
    from zsbir.losses.domain import reverse_gradient

    x = torch.randn(4, 3, requires_grad=True)
    y = reverse_gradient(x, 0.7)
    assert torch.equal(y, x)
    upstream = torch.randn(4, 3)
    y.backward(upstream)
    assert torch.allclose(x.grad, -0.7 * upstream)


def test_grl_lambda_schedules():
    from zsbir.losses.domain import grl_lambda

    assert grl_lambda("dann", 0.0, 0, 25) == 0.0
    assert grl_lambda("dann", 0.5, 0, 25) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_lambda("dann", 1.0, 0, 25) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    # the ramp is > 0 right away (the official code's bug kept it at 0 until the threshold)
    assert grl_lambda("ramp", 0.0, 2.5, 25) == pytest.approx(0.1)
    assert grl_lambda("ramp", 0.0, 30, 25) == 1.0
    assert grl_lambda("constant", 0.3, 1, 25) == 1.0
    ctx = LossContext(step=15, steps_per_epoch=10)
    assert ctx.epochs_done == 1.5


def test_domain_loss_by_hand_and_reversed_gradient():
    from zsbir.losses.domain import DomainAdversarialLoss

    term = DomainAdversarialLoss(in_dim=2, layers=0, schedule="constant", lambda_max=0.5,
                                 views=["sketch", "photo_pos"], reduction="mean")
    linear = term.classifier[0]
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -1.0]]))
        linear.bias.zero_()
    sketch = torch.tensor([[1.0, 0.0]], requires_grad=True)
    photo = torch.tensor([[0.0, 2.0]], requires_grad=True)
    value = term({}, {"sketch": out(embedding=sketch), "photo_pos": out(embedding=photo)}, LossContext())
    # logits: sketch 1 (target 0), photo -2 (target 1): BCE = (log(1+e^1) + log(1+e^2)) / 2
    expected = (math.log(1 + math.e) + math.log(1 + math.e**2)) / 2
    assert float(value.detach()) == pytest.approx(expected, abs=1e-6)
    value.backward()
    # d/dlogit of BCE: sigmoid(z) - target, /2 for the mean; the GRL multiplies by -0.5
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    g_sketch = -0.5 * (sig(1) - 0) / 2 * torch.tensor([1.0, -1.0])
    g_photo = -0.5 * (sig(-2) - 1) / 2 * torch.tensor([1.0, -1.0])
    assert torch.allclose(sketch.grad[0], g_sketch, atol=1e-6)
    assert torch.allclose(photo.grad[0], g_photo, atol=1e-6)
    # the classifier itself descends (no reversal on its own parameters)
    assert linear.weight.grad is not None


def test_domain_loss_view_sum_is_the_official_sum_of_per_view_means():
    # official baseline train.py:101-105: ratio * (BCE(pos) + BCE(neg) + BCE(sketch)), each a batch mean
    from zsbir.losses.domain import DomainAdversarialLoss

    term = DomainAdversarialLoss(in_dim=1, layers=0, schedule="constant")
    with torch.no_grad():
        term.classifier[0].weight.fill_(1.0)
        term.classifier[0].bias.zero_()
    sketch, pos, neg = torch.tensor([[1.0], [3.0]]), torch.tensor([[-2.0], [0.0]]), torch.tensor([[0.5], [-1.0]])
    outputs = {"sketch": out(embedding=sketch), "photo_pos": out(embedding=pos), "photo_neg": out(embedding=neg)}
    softplus = lambda z: math.log(1 + math.exp(z))  # noqa: E731  BCE(target 0) = softplus(z), (target 1) = softplus(-z)
    per_view = [(softplus(1) + softplus(3)) / 2, (softplus(2) + softplus(0)) / 2, (softplus(-0.5) + softplus(1)) / 2]
    assert float(term({}, outputs, LossContext())) == pytest.approx(sum(per_view), abs=1e-6)
    term.reduction = "mean"
    assert float(term({}, outputs, LossContext())) == pytest.approx(sum(per_view) / 3, abs=1e-6)
    with pytest.raises(LossConfigError, match="reduction"):
        DomainAdversarialLoss(in_dim=4, reduction="sum")


def test_domain_classifier_is_the_papers_mlp():
    from zsbir.losses.domain import DomainAdversarialLoss

    term = DomainAdversarialLoss(in_dim=64)
    linears = [m for m in term.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 1024), (1024, 1024), (1024, 1024), (1024, 1024), (1024, 1)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in term.classifier) == 4
    with pytest.raises(LossConfigError, match="schedule"):
        DomainAdversarialLoss(in_dim=4, schedule="linear")


# ---------------------------------------------------------------------------- distill
class FixedTeacher(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.weight = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.seen: list[torch.Tensor] = []

    def forward(self, images):
        self.seen.append(images)
        return self.logits[: len(images)]


def distill_term(tmp_path, mask: dict | None, kdneg: float = 0.3, **kwargs):
    from zsbir.losses.distill import DistillationLoss

    path = None
    if mask is not None:
        path = tmp_path / "cid_mask.pickle"
        with path.open("wb") as handle:
            pickle.dump(mask, handle)
    term = DistillationLoss(kdneg=kdneg, mask=None if path is None else str(path), teacher_tiny=True,
                            teacher_pretrained=None, **kwargs)
    return term


def test_distillation_by_hand_with_the_class_mask(tmp_path):
    rng = np.random.default_rng(0)
    mask = {0: rng.random(1000).astype(np.float32), 1: rng.random(1000).astype(np.float32)}
    term = distill_term(tmp_path, mask, lambda_kd=1.0, kdneg=0.3)
    teacher_logits = torch.tensor(rng.normal(size=(2, 1000)), dtype=torch.float32)
    student = torch.tensor(rng.normal(size=(2, 1000)), dtype=torch.float32)
    batch = {"label": torch.tensor([1, 0]), "photo_pos": torch.zeros(2, 3, 4, 4)}
    ctx = LossContext(class_names=["a", "b"])
    value = term(batch, {"photo_pos": out(embedding=student, kd_logits=student, teacher_logits=teacher_logits)}, ctx)
    q = softmax(teacher_logits.numpy() + 0.3 * np.stack([mask[1], mask[0]]))
    log_p = np.log(softmax(student.numpy()))
    assert float(value) == pytest.approx(float(-(q * log_p).sum(axis=1).mean()), rel=1e-5)


def test_distillation_ignores_sketches(tmp_path):
    from zsbir.models.auxiliary import TeacherLogits

    term = distill_term(tmp_path, None)
    teacher = TeacherLogits(FixedTeacher(torch.randn(3, 1000)), "imagenet", term.views)
    photo = torch.randn(3, 1000)
    batch = {"label": torch.tensor([0, 1, 2]), "photo_pos": torch.zeros(3, 3, 4, 4), "sketch": torch.zeros(3, 3, 4, 4)}
    ctx = LossContext(class_names=["a", "b", "c"])
    values = []
    for s in (torch.randn(3, 1000), torch.randn(3, 1000) * 50):
        outputs = {"photo_pos": out(embedding=photo, kd_logits=photo), "sketch": out(embedding=s, kd_logits=s)}
        teacher(batch, outputs, type("E", (), {"norm": "imagenet"})())  # the training step's auxiliary pass
        values.append(term(batch, outputs, ctx))
    assert torch.equal(values[0], values[1])
    assert [len(images) for images in teacher.teacher.seen] == [3, 3]  # the teacher saw the photos only
    assert "teacher_logits" not in outputs["sketch"]
    with pytest.raises(LossConfigError, match="loss.distill.views"):
        distill_term(tmp_path, None, views=["sketch"])


def test_distillation_needs_a_pretrained_teacher():
    from zsbir.losses.distill import DistillationLoss

    with pytest.raises(LossConfigError, match="teacher_pretrained is null"):
        DistillationLoss(mask=None, teacher_pretrained=None, teacher_tiny=False)


def test_distillation_teacher_follows_the_model(compose_cfg):
    cfg = compose_cfg("model=cse_resnet50", "loss=[ce,distill]")
    assert (cfg.loss.distill.teacher_arch, cfg.loss.distill.teacher_pretrained) == ("legacy_seresnet50", "legacy_seresnet50.in1k")
    smoke = compose_cfg("experiment=sake", "debug=smoke")
    assert (smoke.loss.distill.teacher_pretrained, smoke.loss.distill.teacher_tiny) == (None, True)


def test_distillation_teacher_gets_its_own_normalisation():
    from zsbir.models.encoder import renormalize

    raw = torch.rand(2, 3, 4, 4)
    (mc, sc), (mi, si) = NORMALIZATION["clip"], NORMALIZATION["imagenet"]
    as_clip = (raw - torch.tensor(mc).view(1, 3, 1, 1)) / torch.tensor(sc).view(1, 3, 1, 1)
    as_imagenet = (raw - torch.tensor(mi).view(1, 3, 1, 1)) / torch.tensor(si).view(1, 3, 1, 1)
    assert torch.allclose(renormalize(as_clip, "clip", "imagenet"), as_imagenet, atol=1e-5)
    assert renormalize(as_imagenet, "imagenet", "imagenet") is as_imagenet


def test_class_mask_loading_is_safe_and_checked(tmp_path):
    from zsbir.losses.distill import load_class_mask

    rows = {i: np.full(1000, i, dtype=np.float32) for i in range(3)}
    good = tmp_path / "good.pickle"
    good.write_bytes(pickle.dumps(rows))
    matrix = load_class_mask(good, 3)
    assert matrix.shape == (3, 1000) and float(matrix[2, 0]) == 2.0
    np.save(tmp_path / "mask.npy", matrix.numpy())
    assert torch.equal(load_class_mask(tmp_path / "mask.npy", 3), matrix)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps({0: Exploit()}))
    with pytest.raises(LossConfigError, match="refusing to load builtins.print"):
        load_class_mask(evil, 1)
    with pytest.raises(LossConfigError, match="no row for seen class ids \\[3\\]"):
        load_class_mask(good, 4)


def test_class_mask_missing_file_or_off(tmp_path):
    missing = distill_term(tmp_path, None)
    missing.mask_path = "cid_mask.pickle"
    ctx = LossContext(class_names=["a"], split_dir=tmp_path / "zeroshot1")
    with pytest.raises(LossConfigError, match=r"zeroshot1/cid_mask.pickle does not exist.*loss.distill.mask=null"):
        missing.on_train_start(ctx, ["a"])
    ctx.split_dir = None  # a dataset without split files of its own (the generated benchmark)
    missing.mask_path = str(tmp_path / "elsewhere" / "cid_mask.pickle")  # an explicit path must exist, always
    with pytest.raises(LossConfigError, match="elsewhere/cid_mask.pickle does not exist"):
        missing.on_train_start(ctx, ["a"])
    missing.mask_path = "cid_mask.pickle"  # the generated benchmark has no ImageNet classes: off, with a log line
    missing.on_train_start(ctx, ["a"])
    assert missing.mask_path is None and missing.class_mask is None
    assert distill_term(tmp_path, {0: np.zeros(1000)}, kdneg=0).mask_path is None


# ---------------------------------------------------------------------------- contrastive
def supcon_by_hand(z: np.ndarray, labels: list[int], t: float) -> float:
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    losses = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        denom = sum(math.exp(z[i] @ z[a] / t) for a in others)
        pos = [p for p in others if labels[p] == labels[i]]
        if pos:
            losses.append(-sum(math.log(math.exp(z[i] @ z[p] / t) / denom) for p in pos) / len(pos))
    return sum(losses) / len(losses)


def contrastive_inputs(rng):
    views = {v: torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32)
             for v in ("sketch", "sketch_v2", "photo_pos", "photo_pos_v2")}
    batch = {"label": torch.tensor([0, 1, 0])}
    return batch, views


def test_contrastive_by_hand():
    from zsbir.losses.contrastive import SupConLoss

    batch, views = contrastive_inputs(np.random.default_rng(1))
    value = SupConLoss(temperature=0.5)(batch, {v: out(embedding=e) for v, e in views.items()}, LossContext())
    z = torch.cat(list(views.values())).numpy()
    assert float(value) == pytest.approx(supcon_by_hand(z, [0, 1, 0] * 4, 0.5), rel=1e-5)


def test_contrastive_positives_are_same_class_across_modalities():
    from zsbir.losses.contrastive import supcon_loss

    # a sketch and a photo of class 0, a photo of class 1: the loss falls when the class-0
    # photo moves towards the sketch, and rises when the class-1 photo does.
    sketch, photo_same, photo_other = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0, 0.2]])
    labels = torch.tensor([0, 0, 1])

    def loss(a, b, c):
        return float(supcon_loss(F.normalize(torch.cat([a, b, c])), labels, 0.1))

    base = loss(sketch, photo_same, photo_other)
    assert loss(sketch, torch.tensor([[0.9, 0.1]]), photo_other) < base
    assert loss(sketch, photo_same, torch.tensor([[0.9, 0.1]])) > base


def test_contrastive_projection_head():
    from zsbir.losses.contrastive import SupConLoss

    term = SupConLoss(projection_dim=8, in_dim=4)
    assert term.projection[-1].out_features == 8
    batch, views = contrastive_inputs(np.random.default_rng(2))
    value = term(batch, {v: out(embedding=e) for v, e in views.items()}, LossContext())
    value.backward()
    assert term.projection[0].weight.grad.abs().sum() > 0
    with pytest.raises(LossConfigError, match="in_dim"):
        SupConLoss(projection_dim=8)


def test_all_gather_with_grad_is_the_identity_without_a_process_group():
    from zsbir.engine.distributed import all_gather_with_grad

    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x


# ---------------------------------------------------------------------------- memory
def memory_inputs(sketch, photo, labels):
    batch = {"label": torch.tensor(labels)}  # the positive photo shares its sketch's label
    outputs = {"sketch": out(embedding=sketch, pooled=sketch), "photo_pos": out(embedding=photo, pooled=photo)}
    return batch, outputs


def test_memory_by_hand_and_gradient_into_photo_features():
    from zsbir.losses.memory import CategoryMemoryLoss

    term = CategoryMemoryLoss(slots=2, views=["sketch", "photo_pos"])
    ctx = LossContext(class_names=["a", "b"])
    sketch = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    photo = torch.tensor([[1.0, 1.0], [1.0, 0.0]], requires_grad=True)
    batch, outputs = memory_inputs(sketch, photo, [0, 1])
    value = term(batch, outputs, ctx)
    # centres: class 0 (1, 0), class 1 (0, 1); cos = 1/sqrt2 and 0
    assert float(value.detach()) == pytest.approx(1 - (1 / math.sqrt(2) + 0) / 2, abs=1e-6)
    value.backward()
    assert photo.grad.abs().sum() > 0  # the official code's loss had no gradient at all
    assert sketch.grad is None  # the memory stores detached sketch features


def test_memory_is_fifo_per_class_and_checkpointed():
    from zsbir.losses.memory import CategoryMemoryLoss

    term = CategoryMemoryLoss(slots=2, views=["sketch", "photo_pos"])
    ctx = LossContext(class_names=["a", "b", "c"])
    photo = torch.ones(1, 2)
    for value, label in ((1.0, 0), (2.0, 0), (5.0, 1), (3.0, 0)):
        term(*memory_inputs(torch.full((1, 2), value), photo, [label]), ctx)
    # class 0 received 1, 2, 3: the oldest (1) was replaced; class 1 is untouched
    assert sorted(term.bank[0, :, 0].tolist()) == [2.0, 3.0]
    assert term.bank[1, 0, 0] == 5.0 and term.writes.tolist() == [3, 1, 0]
    centre, has_centre = term.centres()
    assert centre[0].tolist() == [2.5, 2.5] and centre[1].tolist() == [5.0, 5.0] and has_centre.tolist() == [True, True, False]

    restored = CategoryMemoryLoss(slots=2, views=["sketch", "photo_pos"])
    restored.load_state_dict(term.state_dict())
    assert torch.equal(restored.bank, term.bank) and torch.equal(restored.writes, term.writes)


def test_memory_skips_photos_of_classes_it_has_not_seen():
    from zsbir.losses.memory import CategoryMemoryLoss

    term = CategoryMemoryLoss(slots=2, views=["sketch", "photo_neg"])
    ctx = LossContext(class_names=["a", "b"])
    photo = torch.randn(1, 2, requires_grad=True)
    batch = {"label": torch.tensor([0]), "neg_label": torch.tensor([1])}
    sketch = torch.randn(1, 2)
    value = term(batch, {"sketch": out(embedding=sketch, pooled=sketch), "photo_neg": out(embedding=photo, pooled=photo)}, ctx)
    assert float(value.detach()) == 0.0
    value.backward()  # still part of the graph


# ---------------------------------------------------------------------------- clip_text
class TextEncoder:
    norm = "clip"
    logit_scale = torch.tensor(10.0)

    def text_embeddings(self, names):
        return F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[: len(names)], dim=1)


def test_clip_text_by_hand():
    from zsbir.losses.clip_text import CLIPTextLoss

    sketch, photo = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    batch = {"label": torch.tensor([1])}
    ctx = LossContext(encoder=TextEncoder(), class_names=["cat", "dog", "cow"])
    value = CLIPTextLoss(views=["sketch", "photo_pos"])(batch, {"sketch": out(embedding=sketch), "photo_pos": out(embedding=photo)}, ctx)
    r = 1 / math.sqrt(2)
    sketch_logits, photo_logits = 10 * np.array([1.0, 0.0, r]), 10 * np.array([0.0, 1.0, r])
    expected = -(math.log(softmax(sketch_logits)[1]) + math.log(softmax(photo_logits)[1])) / 2
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_clip_text_needs_a_text_tower():
    from zsbir.losses.clip_text import CLIPTextLoss
    from zsbir.models.cnn import CNNEncoder

    encoder = CNNEncoder(tiny=True, embed_dim=8)
    ctx = LossContext(encoder=encoder, class_names=["cat"])
    with pytest.raises(LossConfigError, match="model=clip_prompt"):
        CLIPTextLoss().on_train_start(ctx, ["cat"])


# ---------------------------------------------------------------------------- the loss set
def test_loss_set_reports_every_unweighted_term(compose_cfg):
    cfg = compose_cfg("loss=[triplet,domain_grl,contrastive]", "loss.domain_grl.weight=0.5",
                      "loss.contrastive.weight=0.1", "model.embed_dim=4")
    loss_set = build_loss_set(cfg.loss)
    assert loss_set.views == ("sketch", "photo_pos", "photo_neg", "sketch_v2", "photo_pos_v2")
    rng = np.random.default_rng(3)
    outputs = {v: out(embedding=torch.tensor(rng.normal(size=(4, 4)), dtype=torch.float32)) for v in loss_set.views}
    batch = {"label": torch.tensor([0, 1, 2, 3]), "neg_label": torch.tensor([1, 2, 3, 0])}
    total, terms = loss_set(batch, outputs, LossContext())
    assert set(terms) == {"triplet", "domain_grl", "contrastive"}
    expected = terms["triplet"] + 0.5 * terms["domain_grl"] + 0.1 * terms["contrastive"]
    assert float(total.detach()) == pytest.approx(float(expected.detach()))


def test_loss_math_runs_in_float32_under_autocast(compose_cfg):
    cfg = compose_cfg("loss=[triplet,contrastive]", "model.embed_dim=4")
    loss_set = build_loss_set(cfg.loss)
    rng = np.random.default_rng(4)
    outputs = {v: out(embedding=torch.tensor(rng.normal(size=(4, 4)), dtype=torch.bfloat16)) for v in loss_set.views}
    batch = {"label": torch.tensor([0, 1, 2, 3]), "neg_label": torch.tensor([1, 2, 3, 0])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = loss_set(batch, outputs, LossContext())
    as_float = {v: out(embedding=o["embedding"].float()) for v, o in outputs.items()}
    reference_total, reference = loss_set(batch, as_float, LossContext())
    assert all(value.dtype == torch.float32 for value in terms.values())
    assert float(total) == pytest.approx(float(reference_total), rel=1e-6)


def test_bad_loss_config_reaches_the_user_as_our_error(compose_cfg):
    cfg = compose_cfg("loss=[domain_grl]", "loss.domain_grl.schedule=linear")
    with pytest.raises(LossConfigError, match="loss.domain_grl.schedule must be one of"):
        build_loss_set(cfg.loss)


# ---------------------------------------------------------------------------- distributed
def _gather_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    import torch.distributed as torch_dist

    from zsbir.engine.distributed import all_gather_with_grad
    from zsbir.losses.contrastive import SupConLoss

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x = torch.full((2, 3), float(rank), requires_grad=True)
        gathered = all_gather_with_grad(x)
        (gathered * (rank + 1)).sum().backward()  # rank r's loss weighs every row by r + 1
        batch, views = contrastive_inputs(np.random.default_rng(10 + rank))
        value = SupConLoss(temperature=0.5)(batch, {v: out(embedding=e) for v, e in views.items()}, LossContext())
        from zsbir.losses.memory import CategoryMemoryLoss

        memory = CategoryMemoryLoss(slots=4, views=["sketch", "photo_pos"])
        sketch = torch.full((1, 2), float(rank + 1))  # rank 0 stores class 0, rank 1 class 1
        memory(*memory_inputs(sketch, torch.ones(1, 2), [rank]), LossContext(class_names=["a", "b"]))
        torch.save({"gathered": gathered.detach(), "grad": x.grad, "supcon": value.detach(), "bank": memory.bank,
                    "writes": memory.writes}, f"{result_file}.{rank}")
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~10 s alone, a minute on a busy machine
def test_gather_with_grad_and_contrastive_across_two_ranks(tmp_path):
    torch.multiprocessing.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2)
    results = [torch.load(tmp_path / f"result.{r}", weights_only=True) for r in range(2)]
    expected_rows = torch.cat([torch.zeros(2, 3), torch.ones(2, 3)])
    assert all(torch.equal(r["gathered"], expected_rows) for r in results)
    # every rank's loss reaches every rank's rows: d/dx_r = 1 + 2 on both ranks
    assert all(torch.equal(r["grad"], torch.full((2, 3), 3.0)) for r in results)
    # local anchors against the global contrast set: the ranks' mean is the one-process loss
    views = [contrastive_inputs(np.random.default_rng(10 + r))[1] for r in range(2)]
    z = torch.cat([torch.cat(list(v.values())) for v in views]).numpy()
    labels = [0, 1, 0] * 8
    # every rank stores the sketches of all ranks: the memories agree
    assert results[0]["writes"].tolist() == results[1]["writes"].tolist() == [1, 1]
    assert torch.equal(results[0]["bank"], results[1]["bank"]) and float(results[0]["bank"][1, 0, 0]) == 2.0
    assert float((results[0]["supcon"] + results[1]["supcon"]) / 2) == pytest.approx(supcon_by_hand(z, labels, 0.5), rel=1e-5)
