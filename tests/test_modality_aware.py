"""MA-ZS-SBIR (experiment=ma_zs_sbir): preset settings, loss math against the official definitions, a smoke run."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.smokerun import fixed_batch_losses
from zsbir.losses.base import LossContext
from zsbir.models.encoder import EncoderOutput
from zsbir.models.modality_aware import MODALITY_IDS, ModalityAwareCLIP

SMOKE = ("experiment=ma_zs_sbir", "data=synthetic", "debug=smoke", "trainer.device=cpu")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return ModalityAwareCLIP(pretrained=None, image_size=32, tiny=True)


def step_rows(model, labels_sketch, labels_photo, class_names):
    """Hand-made step outputs: random unit image embeddings + the pass's class texts."""
    from zsbir.losses.modality_aware import ClassTextPass

    batch = {"label": torch.tensor(labels_sketch), "photo_label": torch.tensor(labels_photo)}
    outputs = {"sketch": EncoderOutput(embedding=F.normalize(torch.randn(len(labels_sketch), 512), dim=-1)),
               "photo": EncoderOutput(embedding=F.normalize(torch.randn(len(labels_photo), 512), dim=-1))}
    text_pass = ClassTextPass(("sketch", "photo"))
    text_pass.prepare(model, class_names)
    text_pass(batch, outputs, model)
    return batch, outputs, LossContext(encoder=model, class_names=class_names)


def test_preset_carries_the_official_settings(compose_cfg):
    cfg = compose_cfg("experiment=ma_zs_sbir", "data=sketchy_split2")
    assert cfg.method == "ma_zs_sbir" and cfg.model.name == "ma_clip" and cfg.model.arch == "ViT-B-32-quickgelu"
    assert (cfg.model.clip_lr, cfg.optim.lr, cfg.optim.weight_decay) == (5e-8, 5e-3, 0.1)
    assert cfg.optim._target_ == "torch.optim.AdamW" and cfg.sched.name == "constant" and cfg.sched.warmup_fraction == 0.05
    assert (cfg.model.n_modes, cfg.model.logit_scale_init, cfg.model.text_template) == (4, 2.6592, "a photo of a {}.")
    assert (cfg.trainer.max_epochs, cfg.data.image_size, cfg.data.augment, cfg.eval.protocol) == (100, 224, "none", "voc")
    assert cfg.data.stream_batch.sketch + cfg.data.stream_batch.photo == cfg.data.batch_size == 256
    weights = {name: term.weight for name, term in cfg.loss.items()}
    official = {"ma_contrastive": 1.0, "ma_center": 0.1, "ma_discriminator": 0.1, "ma_reconstruct": 0.02}
    for name, ratio in official.items():  # the weighted mean of the official ModalAwareModel.forward
        assert weights[name] == pytest.approx(ratio / sum(official.values()), rel=1e-5), name
    assert compose_cfg("experiment=ma_zs_sbir", "data=tuberlin").model.text_template == "a photo of {}."


def test_pair_positives_are_clips_own_loss(tiny_model):
    from open_clip.loss import ClipLoss

    from zsbir.losses.modality_aware import MAContrastiveLoss

    batch, outputs, ctx = step_rows(tiny_model, [0, 1, 1], [2, 0], ["a", "b", "c"])
    image = torch.cat([outputs["sketch"]["embedding"], outputs["photo"]["embedding"]])
    text = torch.cat([outputs["sketch"]["text"], outputs["photo"]["text"]])
    expected = ClipLoss()(image, text, tiny_model.logit_scale)
    assert torch.allclose(MAContrastiveLoss("pair")(batch, outputs, ctx), expected, atol=1e-5)


def test_class_positives_equal_pairs_when_every_class_appears_once_and_differ_otherwise(tiny_model):
    from zsbir.losses.modality_aware import MAContrastiveLoss

    distinct = step_rows(tiny_model, [0, 1], [2, 3], ["a", "b", "c", "d"])
    assert torch.allclose(MAContrastiveLoss("class")(*distinct), MAContrastiveLoss("pair")(*distinct), atol=1e-5)
    shared = step_rows(tiny_model, [0, 1], [0, 1], ["a", "b"])
    assert not torch.allclose(MAContrastiveLoss("class")(*shared), MAContrastiveLoss("pair")(*shared))


def test_center_and_reconstruction_follow_the_official_formulas(tiny_model):
    from zsbir.losses.modality_aware import MACenterLoss, MAReconstructLoss

    batch, outputs, ctx = step_rows(tiny_model, [0, 1], [1], ["a", "b"])
    image = torch.cat([outputs["sketch"]["embedding"], outputs["photo"]["embedding"]])
    text = torch.cat([outputs["sketch"]["text"], outputs["photo"]["text"]])
    modes = tiny_model.mode_embedding
    image_mode = modes[torch.tensor([1, 1, 0])]
    text_mode = modes[MODALITY_IDS["text"]]
    centre = F.normalize((image + text) / 2, dim=-1)
    cosine = torch.nn.CosineEmbeddingLoss()  # what the official code uses, target 1
    ones = torch.ones(len(image))
    expected_center = cosine(F.normalize(text - text_mode, dim=-1), centre, ones) + cosine(
        F.normalize(image - image_mode, dim=-1), centre, ones)
    expected_rec = cosine(F.normalize(text - text_mode + image_mode, dim=-1), image, ones) + cosine(
        F.normalize(image - image_mode + text_mode, dim=-1), text, ones)
    assert torch.allclose(MACenterLoss()(batch, outputs, ctx), expected_center, atol=1e-5)
    assert torch.allclose(MAReconstructLoss()(batch, outputs, ctx), expected_rec, atol=1e-5)


def test_discriminator_never_asks_for_a_samples_own_modality(tiny_model):
    from zsbir.losses.modality_aware import MADiscriminatorLoss

    batch, outputs, ctx = step_rows(tiny_model, [0, 1], [1], ["a", "b"])
    torch.manual_seed(3)
    term = MADiscriminatorLoss(embed_dim=512, n_modes=4)
    image = torch.cat([outputs["sketch"]["embedding"], outputs["photo"]["embedding"]])
    text = torch.cat([outputs["sketch"]["text"], outputs["photo"]["text"]])
    modes = tiny_model.mode_embedding

    def side(semantics, own):  # one cross-entropy per (sample, other modality), averaged
        terms = [F.cross_entropy(term.classifier(F.normalize(semantics[i] + modes[k], dim=-1))[None], torch.tensor([k]))
                 for i in range(len(semantics)) for k in range(4) if k != own[i]]
        return torch.stack(terms).mean()

    own_image = [1, 1, 0]
    expected = (side(text - modes[3], [3, 3, 3]) + side(image - modes[torch.tensor(own_image)], own_image)) / 2
    assert torch.allclose(term(batch, outputs, ctx), expected, atol=1e-5)


def test_converted_retrieval_moves_sketch_queries_only_at_evaluation():
    torch.manual_seed(0)
    model = ModalityAwareCLIP(pretrained=None, image_size=32, tiny=True, retrieval="converted").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        photo = model(images, "photo")["embedding"]
        sketch = model(images, "sketch")["embedding"]
        modes = model.mode_embedding
        expected = F.normalize(photo - modes[MODALITY_IDS["sketch"]] + modes[MODALITY_IDS["photo"]], dim=-1)
        assert torch.allclose(sketch, expected, atol=1e-5)
        assert torch.allclose(model.train()(images, "sketch")["embedding"], photo, atol=1e-5)


def test_total_loss_goes_down_on_a_fixed_batch(compose_cfg, tmp_path):
    from zsbir.engine.trainer import Trainer

    # The official CLIP lr (5e-8) barely moves a tiny random CLIP; larger rates make the decrease
    # unambiguous while exercising the same terms and trainable set.
    cfg = compose_cfg(*SMOKE, "trainer.max_steps=200", "model.clip_lr=1e-3", "optim.lr=5e-2",
                      "data.by_dataset.synthetic.stream_batch.sketch=16", "data.by_dataset.synthetic.stream_batch.photo=16")
    trainer = Trainer(cfg, tmp_path / "run")
    losses, history = fixed_batch_losses(trainer)
    assert all(set(trainer.loss_set.terms) <= {k.removeprefix("loss/") for k in logs} for logs in history)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.95 * losses[0], losses
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups["clip"] == pytest.approx(1e-3 * trainer.scheduler.lr_lambdas[0](trainer.step), rel=1e-6)


def test_smoke_run_writes_metrics_with_parameter_counts(compose_cfg, tmp_path):
    from zsbir.train import run

    run_dir = tmp_path / "run"
    run(compose_cfg(*SMOKE, "eval.grids.queries=0"), str(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "ma_zs_sbir" and metrics["steps"] > 0
    # trainable: the whole CLIP + the modality table (the discriminator is counted with the losses)
    assert metrics["params_total"] == metrics["params_trainable"] > 0
    assert 0 <= metrics["test"]["map_all"] <= 1 and (run_dir / "best.pt").is_file()
