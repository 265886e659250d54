"""PuXIM with shrunk towers: the VxL mask, the interaction head, the three losses, CLS retrieval."""
from __future__ import annotations

import json

import pytest
import torch

from zsbir.losses.base import LossConfigError
from zsbir.losses.puxim import InteractionHead
from zsbir.models.puxim import PuXIMEncoder
from zsbir.models.vxl import VxLConfigError, VxLSampler, kept_count, most_relevant, shared_sampler

SMOKE = ("experiment=puxim", "data=synthetic", "debug=smoke", "trainer.device=cpu")


def tiny_sampler(mask_ratio: float = 0.7, image_size: int = 32) -> VxLSampler:
    return shared_sampler("ViT-B-16", None, image_size, mask_ratio, "a photo of a {}", True)


# ------------------------------------------------------------------ VxL mask


@pytest.mark.parametrize("n_patches,mask_ratio,expected", [(196, 0.7, 59), (16, 0.7, 5), (16, 0.5, 8), (16, 0.0, 16),
                                                          (16, 0.99, 1)])
def test_kept_count_is_the_configured_fraction(n_patches, mask_ratio, expected):
    assert kept_count(n_patches, mask_ratio) == expected


def test_most_relevant_keeps_exactly_the_top_scores():
    generator = torch.Generator().manual_seed(0)
    relevance = torch.stack([torch.randperm(196, generator=generator) for _ in range(4)]).float()
    kept = most_relevant(relevance, 59)
    assert kept.shape == (4, 59)
    for row in range(4):  # scores are a permutation of 0..195: the kept ones are exactly 137..195
        assert sorted(relevance[row, kept[row]].tolist()) == list(range(137, 196))
        assert torch.equal(kept[row], kept[row].sort().values)  # ascending patch order
    tied = torch.zeros(1, 16)
    assert most_relevant(tied, 5).tolist() == [[0, 1, 2, 3, 4]]  # ties go to the lower index


def test_vxl_plain_scoring_keeps_the_patches_most_relevant_to_each_photos_class():
    """Relevance known by construction: each class's text embedding IS one chosen patch's feature."""
    sampler = VxLSampler(pretrained=None, image_size=32, tiny=True, scoring="plain", text_template="a photo of a {}")
    assert sampler.grid == (4, 4) and sampler.n_keep == 5
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    visual = sampler.model.visual
    with torch.no_grad():
        _, tokens = visual(images)
        features = torch.nn.functional.normalize(tokens @ visual.proj, dim=-1)  # 3 x 16 x d
    chosen = [2, 13, 7]  # the patch whose feature becomes the text of photo i's class
    names = ["class_a", "class_b", "class_c"]
    texts = {f"a photo of a class {c}": features[i, p] for i, (c, p) in enumerate(zip("abc", chosen))}
    sampler.encode_texts = lambda strings: torch.stack([texts[s] for s in strings])  # the text tower, replaced
    labels = torch.tensor([0, 1, 2])
    relevance = sampler.relevance(images, sampler.text_embeddings(names)[labels])
    assert torch.allclose(relevance[torch.arange(3), torch.tensor(chosen)], torch.ones(3), atol=1e-5)
    kept = sampler.keep_index(images, labels, names)
    assert kept.shape == (3, 5)
    for i, patch in enumerate(chosen):
        assert patch in kept[i].tolist()  # cosine 1: the most relevant patch of its photo
        top5 = relevance[i].topk(5).indices.sort().values
        assert torch.equal(kept[i], top5)
    # a photo is scored against ITS class: swapping the labels changes the mask
    swapped = sampler.keep_index(images, torch.tensor([1, 2, 0]), names)
    assert not torch.equal(swapped, kept)


def test_vxl_masks_are_cached_per_photo_id():
    sampler = tiny_sampler(0.5)
    names = ["a", "b"]
    images = torch.randn(2, 3, 32, 32)
    cache = {}
    first = sampler.keep_index(images, torch.tensor([0, 1]), names, photo_ids=[10, 11], cache=cache)
    assert sorted(cache) == [10, 11] and first.shape == (2, 8)
    # the cache answers for the same ids even for other pixels (the photo of an id never changes)
    again = sampler.keep_index(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), names, photo_ids=[10, 11], cache=cache)
    assert torch.equal(first, again)


def test_vxl_rejects_bad_settings():
    with pytest.raises(VxLConfigError, match="mask_ratio"):
        VxLSampler(mask_ratio=1.0, tiny=True, pretrained=None, image_size=32)
    with pytest.raises(VxLConfigError, match="vxl.pretrained is null"):
        VxLSampler(pretrained=None, tiny=False)
    with pytest.raises(VxLConfigError, match="4x4 patch grid but the encoder a 8x8"):
        tiny_sampler(0.7, image_size=32).check_grid((8, 8))


# ------------------------------------------------------------------ encoder


def test_encoder_embedding_is_the_cls_token_and_masked_pass_is_consistent():
    encoder = PuXIMEncoder(tiny=True, pretrained=None, image_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    out = encoder(images, "sketch")
    features = encoder.vit.forward_features(images)
    assert encoder.embed_dim == 64 and encoder.patch_grid == (4, 4)
    assert torch.equal(out["embedding"], features[:, 0])  # CLS after the final norm, no projection
    assert out["tokens"].shape == (2, 16, 64)
    assert torch.equal(encoder(images, "photo")["embedding"], out["embedding"])  # one shared tower
    # keeping every patch is the ordinary forward; keeping a subset changes the CLS
    everything = torch.arange(16).expand(2, 16)
    full = encoder.encode_masked(images, "photo", everything)
    assert torch.allclose(full["embedding"], out["embedding"], atol=1e-6)
    assert torch.allclose(full["tokens"], out["tokens"], atol=1e-6)
    subset = encoder.encode_masked(images, "photo", torch.tensor([[0, 5, 9, 15], [1, 2, 3, 4]]))
    assert subset["tokens"].shape == (2, 4, 64) and not torch.allclose(subset["embedding"], out["embedding"])
    with pytest.raises(ValueError, match="outside 0..15"):
        encoder.encode_masked(images, "photo", torch.tensor([[0, 16], [1, 2]]))
    projected = PuXIMEncoder(tiny=True, pretrained=None, image_size=32, embed_dim=24)
    assert projected(images, "photo")["embedding"].shape == (2, 24)


def test_tiny_encoder_rejects_a_weights_tag():
    with pytest.raises(ValueError, match="model.pretrained=null"):
        PuXIMEncoder(tiny=True, pretrained="augreg_in21k_ft_in1k", image_size=32)


def test_missing_imagenet_weights_fail_fast_offline(monkeypatch):
    from zsbir.models.weights import MissingWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("zsbir.models.weights._timm_cached_file", lambda cfg: None)
    with pytest.raises(MissingWeightsError, match="vit_base_patch16_224.augreg_in21k_ft_in1k"):
        PuXIMEncoder(pretrained="augreg_in21k_ft_in1k", image_size=224)


def test_missing_vxl_weights_name_the_loss_key(monkeypatch):
    from zsbir.losses.puxim import PurifiedMatchingLoss
    from zsbir.models.weights import MissingWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *args, **kwargs: None)
    with pytest.raises(MissingWeightsError, match=r"loss\.puxim_match\.vxl\.pretrained=/path/to/file"):
        PurifiedMatchingLoss(vxl={"mask_ratio": 0.65}, tiny=False)


# ------------------------------------------------------------------ interaction head


def test_match_logit_does_not_depend_on_other_samples_of_the_batch():
    torch.manual_seed(0)
    head = InteractionHead(d_model=64, nhead=4, dim_feedforward=128, num_layers=4).eval()
    sketch, photos = torch.randn(5, 16, 64), torch.randn(5, 5, 64)
    with torch.no_grad():
        logits = head(sketch, photos)
        alone = head(sketch[:1], photos[:1])
        others_changed = head(torch.cat([sketch[:1], torch.randn(4, 16, 64)]),
                              torch.cat([photos[:1], torch.randn(4, 5, 64)]))
        own_photo_changed = head(sketch[:1], torch.randn(1, 5, 64))
    assert logits.shape == (5, 2)
    assert torch.allclose(alone[0], logits[0], atol=1e-5)
    assert torch.allclose(others_changed[0], logits[0], atol=1e-5)
    assert not torch.allclose(own_photo_changed[0], logits[0], atol=1e-3)  # it does look at its own pair


# ------------------------------------------------------------------ training


def test_each_puxim_loss_decreases_on_a_fixed_batch(compose_cfg, tmp_path):
    from zsbir.engine.trainer import Trainer

    # The paper's lr (1e-5) moves the tiny random towers too little to see in a few steps.
    cfg = compose_cfg(*SMOKE, "optim.lr=1e-3", "loss.puxim_match.dropout=0.0", "trainer.max_steps=100")
    assert cfg.loss.puxim_match.vxl == cfg.loss.puxim_recon.vxl
    trainer = Trainer(cfg, tmp_path / "run")
    terms = trainer.loss_set.terms
    assert terms["puxim_recon"].sampler is terms["puxim_match"].sampler  # one VxL CLIP for both
    masked_pass, = trainer.loss_set.auxiliary_passes  # one masked photo pass per step for both terms
    assert terms["puxim_recon"].cache_masks  # data.augment=none
    trainer.loss_set.on_train_start(trainer.ctx, trainer.data.seen_classes)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    assert {"pos_index", "neg_index"} <= set(batch)
    history = []
    for _ in range(10):
        logs = trainer.train_step(batch)
        trainer.step += 1
        history.append({k: float(v) for k, v in logs.items()})
    # the masks of the batch's photos are cached (computed at the first step, reused after)
    photos = set(batch["pos_index"].tolist()) | set(batch["neg_index"].tolist())
    assert set(masked_pass.mask_cache) == photos
    for term in ("triplet", "puxim_recon", "puxim_match"):
        values = [h[f"loss/{term}"] for h in history]
        assert all(torch.isfinite(torch.tensor(values))), (term, values)
        assert values[-1] < 0.95 * values[0], (term, values)


def test_reconstruction_target_is_the_unmasked_encoding_and_carries_no_gradient(compose_cfg, tmp_path):
    from zsbir.engine.trainer import Trainer

    trainer = Trainer(compose_cfg(*SMOKE), tmp_path / "run")
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    outputs = trainer.step_outputs(batch)
    recon = trainer.loss_set.terms["puxim_recon"]
    loss = recon(batch, outputs, trainer.ctx)
    target_grad = torch.autograd.grad(loss, outputs["photo_pos"]["tokens"], retain_graph=True, allow_unused=True)[0]
    assert target_grad is None or not target_grad.any()  # the unmasked tokens are the (stop-grad) target
    encoder_grads = torch.autograd.grad(loss, list(trainer.encoder.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in encoder_grads)  # through the masked pass


def test_puxim_losses_need_the_puxim_encoder(compose_cfg, tmp_path):
    from zsbir.engine.trainer import Trainer

    cfg = compose_cfg("data=synthetic", "debug=smoke", "loss=[triplet,puxim_match]", "trainer.device=cpu")
    with pytest.raises(LossConfigError, match="use model=puxim"):  # before any work: at construction
        Trainer(cfg, tmp_path / "run")
    random_vxl = compose_cfg(*SMOKE, "loss.puxim_recon.tiny=false", "loss.puxim_recon.vxl.pretrained=null")
    with pytest.raises(VxLConfigError, match="vxl.pretrained is null"):
        Trainer(random_vxl, tmp_path / "run2")
    with pytest.raises(VxLConfigError, match="same patch size and input size"):  # 8x8 patches vs VxL 4x4
        Trainer(compose_cfg(*SMOKE, "model.image_size=64"), tmp_path / "run3")


def test_preset_sets_the_papers_settings(compose_cfg):
    cfg = compose_cfg("experiment=puxim")
    assert cfg.method == "puxim" and cfg.model.name == "puxim" and cfg.model.norm == "half"
    assert list(cfg.loss) == ["triplet", "puxim_recon", "puxim_match"]
    assert (cfg.loss.triplet.distance, cfg.loss.triplet.margin, cfg.loss.triplet.weight) == ("euclidean", 1.0, 1.0)
    assert (cfg.loss.puxim_recon.weight, cfg.loss.puxim_match.weight) == (0.05, 0.1)
    match = cfg.loss.puxim_match
    assert (match.d_model, match.nhead, match.dim_feedforward, match.num_layers) == (768, 4, 1024, 4)
    assert cfg.loss.puxim_recon.vxl.mask_ratio == 0.7 and cfg.loss.puxim_match.vxl.mask_ratio == 0.7
    assert (cfg.optim._target_, cfg.optim.lr, cfg.optim.weight_decay) == ("torch.optim.Adam", 1e-5, 1e-3)
    assert cfg.data.image_size == 224 and cfg.model.image_size == 224 and cfg.loss.puxim_recon.vxl.image_size == 224
    override = compose_cfg("experiment=puxim", "loss.puxim_recon.vxl.mask_ratio=0.5")
    assert override.loss.puxim_match.vxl.mask_ratio == 0.5  # one setting drives both terms


def test_smoke_run_evaluates_puxim_with_the_standard_evaluator(compose_cfg, tmp_path):
    from zsbir.train import run

    run_dir = tmp_path / "run"
    result = run(compose_cfg(*SMOKE, "trainer.max_epochs=1"), str(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "puxim" and metrics["model"] == "puxim" and metrics["steps"] == 3
    assert 0 <= result["test"]["map_all"] <= 1 and result["n_queries"] > 0
    # checkpoints hold the encoder and the loss heads, never the frozen VxL CLIP
    from zsbir.engine.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir / "last.pt")
    assert any(k.startswith("terms.puxim_match.head.") for k in state["losses"])
    assert not any("sampler" in k or "visual" in k for k in state["losses"])


def test_both_puxim_terms_take_their_vxl_settings_from_one_file(compose_cfg):
    from omegaconf import OmegaConf

    from zsbir._paths import config_dir

    shared = OmegaConf.load(f"{config_dir()}/loss/vxl/clip_surgery.yaml")
    alone = compose_cfg("model=puxim", "loss=[puxim_match]")  # without puxim_recon or the preset
    both = compose_cfg("model=puxim", "loss=[puxim_recon,puxim_match]")
    assert alone.loss.puxim_match.vxl == both.loss.puxim_recon.vxl == both.loss.puxim_match.vxl == shared
    per_term = compose_cfg("model=puxim", "loss=[puxim_recon,puxim_match]", "loss.puxim_match.vxl.mask_ratio=0.5")
    assert (per_term.loss.puxim_match.vxl.mask_ratio, per_term.loss.puxim_recon.vxl.mask_ratio) == (0.5, 0.7)
