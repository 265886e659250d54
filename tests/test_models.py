"""Backbones behind the one encoder interface: shapes, trainable sets, CSE conditioning."""
from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from omegaconf import OmegaConf

from zsbir.models.encoder import NORMALIZATION, Encoder, build_encoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
MODELS = ("resnet50", "cse_resnet50", "clip_prompt")
NUM_CLASSES = 7


def model_cfg(name: str, *overrides: str):
    """The model node as a run composes it (`model=<name>`), with command-line style overrides."""
    from hydra import compose, initialize_config_dir

    from zsbir._paths import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", *(f"model.{o}" for o in overrides)])
    return cfg.model


def tiny(name: str, size: int = 32, *overrides: str) -> Encoder:
    torch.manual_seed(0)
    extra = [f"image_size={size}"] if name == "clip_prompt" else []
    return build_encoder(model_cfg(name, "tiny=true", "pretrained=null", *extra, *overrides), NUM_CLASSES)


@pytest.mark.parametrize("name", MODELS)
def test_config_nodes_are_flat_and_complete(name):
    cfg = model_cfg(name)
    for key in ("_target_", "name", "pretrained", "tiny", "norm", "embed_dim"):
        assert key in cfg, f"{name}.yaml lacks {key}"
    assert cfg.name == name and cfg.tiny is False and cfg.pretrained is not None
    assert cfg.norm in NORMALIZATION
    assert all(not OmegaConf.is_config(v) for v in cfg.values()), "model nodes are flat"


EXPECTED = {
    "resnet50": {"embedding": (512,), "pooled": (64,)},
    "cse_resnet50": {"embedding": (512,), "pooled": (256,), "kd_logits": (1000,), "cls_logits": (NUM_CLASSES,)},
}


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", MODELS)
def test_output_shapes_both_domains(name, size):
    encoder = tiny(name, size)
    images = torch.randn(3, 3, size, size)
    for domain in ("sketch", "photo"):
        out = encoder(images, domain)
        if name == "clip_prompt":
            patches = (size // 8) ** 2  # the tiny CLIP has 8 px patches
            expected = {"embedding": (512,), "tokens": (patches, 64)}
        else:
            expected = EXPECTED[name]
        assert {k: tuple(v.shape[1:]) for k, v in out.items()} == expected
        assert all(v.shape[0] == 3 and torch.isfinite(v).all() for v in out.values())
    assert encoder.embed_dim == 512


def test_resnet_separate_towers_and_cls_head():
    encoder = tiny("resnet50", 32, "towers=separate", "cls_head=true", "embed_dim=64")
    assert encoder.sketch_backbone is not encoder.photo_backbone
    sketch_state, photo_state = encoder.sketch_backbone.state_dict(), encoder.photo_backbone.state_dict()
    assert all(torch.equal(sketch_state[k], photo_state[k]) for k in photo_state)
    with torch.no_grad():
        next(encoder.sketch_backbone.parameters()).add_(0.5)
    encoder.eval()
    images = torch.randn(2, 3, 32, 32)
    sketch, photo = encoder(images, "sketch"), encoder(images, "photo")
    assert sketch["cls_logits"].shape == (2, NUM_CLASSES) and sketch["embedding"].shape == (2, 64)
    assert not torch.allclose(sketch["pooled"], photo["pooled"])


def test_resnet_tiny_rejects_a_tag():
    with pytest.raises(ValueError, match="pretrained=null"):
        build_encoder(model_cfg("resnet50", "tiny=true"), NUM_CLASSES)


# ---------------------------------------------------------------- CSE-ResNet


def _plain_and_conditional():
    from zsbir.models.cse_resnet import CSEResNet, build_seresnet

    torch.manual_seed(0)
    plain = build_seresnet(tiny=True, num_classes=0).eval()
    # give the BatchNorms non-trivial statistics so that the comparison means something
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return plain, CSEResNet(copy.deepcopy(plain)).eval()


def test_cse_equals_seresnet_at_init_for_both_tags_and_differs_once_tag_column_trained():
    plain, cse = _plain_and_conditional()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        reference = plain.global_pool(plain.forward_features(images))
        sketch, photo = cse(images, 0.0), cse(images, 1.0)
        torch.testing.assert_close(sketch, reference)
        torch.testing.assert_close(photo, reference)
        for se in cse.se_blocks:
            se.fc2.weight[:, -1:].normal_(0, 1.0)
        sketch, photo = cse(images, 0.0), cse(images, 1.0)
    torch.testing.assert_close(sketch, reference)  # tag 0 multiplies the column by zero
    assert (sketch - photo).abs().max() > 1e-3


def test_cse_every_se_block_is_conditioned_and_tag_reaches_each():
    from timm.models.senet import SEModule

    from zsbir.models.cse_resnet import ConditionalSE

    _, cse = _plain_and_conditional()
    assert not any(isinstance(m, SEModule) for m in cse.modules())
    seen = []
    for se in cse.se_blocks:
        se.register_forward_hook(lambda m, args, out: seen.append(m.domain_tag.clone()))
    cse(torch.randn(2, 3, 32, 32), 1.0)
    assert len(seen) == len(cse.se_blocks) == 4 and all(t.item() == 1.0 for t in seen)
    assert all(se.domain_tag is None for se in cse.se_blocks)  # reset after the pass
    se = cse.se_blocks[0]
    assert isinstance(se, ConditionalSE) and se.fc2.in_channels == se.fc1.out_channels + 1
    with pytest.raises(RuntimeError, match="domain tag"):
        se(torch.randn(1, se.fc1.in_channels, 4, 4))


def test_cse_encoder_domains_use_their_tags():
    encoder = tiny("cse_resnet50", 32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images, "sketch")["pooled"], encoder(images, "photo")["pooled"])
        for se in encoder.backbone.se_blocks:
            se.fc2.weight[:, -1].fill_(2.0)
        assert not torch.allclose(encoder(images, "sketch")["pooled"], encoder(images, "photo")["pooled"])


def _heads(num_features: int, d: int, classes: int) -> int:
    return (num_features * d + d) + (d * 1000 + 1000) + (d * classes + classes)


def test_cse_parameter_count_tiny():
    from zsbir.models.cse_resnet import build_seresnet

    encoder = tiny("cse_resnet50", 32, "embed_dim=64")
    plain = build_seresnet(tiny=True, num_classes=0)
    se_channels = [se.fc1.in_channels for se in encoder.backbone.se_blocks]
    expected = sum(p.numel() for p in plain.parameters()) + sum(se_channels) + _heads(256, 64, NUM_CLASSES)
    assert encoder.num_parameters() == (expected, expected)


def test_cse_parameter_count_real_size():
    import timm

    encoder = build_encoder(model_cfg("cse_resnet50", "pretrained=null", "embed_dim=64"), 100)
    plain = sum(p.numel() for p in timm.create_model("legacy_seresnet50", num_classes=0).parameters())
    assert len(encoder.backbone.se_blocks) == 16
    tag_columns = 3 * 256 + 4 * 512 + 6 * 1024 + 3 * 2048  # one column of C weights per SE block
    expected = plain + tag_columns + _heads(2048, 64, 100)
    assert encoder.num_parameters() == (expected, expected)
    assert plain == 26_039_024


def test_cse_svd_init_reproduces_the_imagenet_logits(tmp_path):
    """With d = rank, kd_head(embed(pooled)) = the classifier; the teacher is that classifier."""
    from zsbir.models.cse_resnet import build_imagenet_teacher, build_seresnet

    torch.manual_seed(1)
    source = build_seresnet(tiny=True, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "tiny_seresnet.pth")
    encoder = build_encoder(
        model_cfg("cse_resnet50", "tiny=true", f"pretrained={tmp_path / 'tiny_seresnet.pth'}", "embed_dim=256"),
        NUM_CLASSES,
    ).eval()
    teacher = build_imagenet_teacher(pretrained=str(tmp_path / "tiny_seresnet.pth"), tiny=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = encoder(images, "photo")
        torch.testing.assert_close(out["kd_logits"], teacher(images), atol=1e-4, rtol=1e-4)
    assert torch.count_nonzero(encoder.embed.bias) == 0


def test_imagenet_teacher_is_frozen_and_stays_in_eval_mode():
    from zsbir.models.cse_resnet import build_imagenet_teacher

    teacher = build_imagenet_teacher(pretrained=None, tiny=True)
    holder = torch.nn.ModuleDict({"teacher": teacher}).train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    logits = teacher(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1000) and not logits.requires_grad


# ---------------------------------------------------------------- CLIP prompts

PROMPTS = {"sketch_prompts", "photo_prompts"}
LAYER_NORMS = {
    f"clip.visual.{name}.{p}"
    for name in ["ln_pre", "ln_post"] + [f"transformer.resblocks.{i}.ln_{j}" for i in range(2) for j in (1, 2)]
    for p in ("weight", "bias")
}


def _trainable(encoder):
    return {n for n, p in encoder.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["prompts", "prompts_ln", "full"])
def test_clip_trainable_set_gradients_and_param_groups(mode):
    encoder = tiny("clip_prompt", 32, f"trainable={mode}")
    visual = {f"clip.visual.{n}" for n, _ in encoder.clip.visual.named_parameters()}
    expected = {"prompts": PROMPTS, "prompts_ln": PROMPTS | LAYER_NORMS, "full": PROMPTS | visual}[mode]
    assert _trainable(encoder) == expected
    assert LAYER_NORMS <= visual and "clip.visual.proj" in visual

    loss = sum(encoder(torch.randn(2, 3, 32, 32), d)["embedding"].sum() for d in ("sketch", "photo"))
    loss.backward()
    with_grad = {n for n, p in encoder.named_parameters() if p.grad is not None}
    assert with_grad == expected

    groups = encoder.param_groups(lr=0.5)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["prompts"] == 1e-4
    if mode != "prompts":
        assert lrs["layernorm"] == 1e-6
    if mode == "full":
        assert lrs["image_tower"] == 0.5
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in encoder.parameters() if p.requires_grad}
    total, trainable = encoder.num_parameters()
    assert trainable == sum(p.numel() for n, p in encoder.named_parameters() if n in expected)
    assert total == sum(p.numel() for p in encoder.parameters())


def test_clip_without_prompts_matches_open_clip_image_encoder():
    """The re-run visual tower is open_clip's own forward when there are no prompts."""
    encoder = tiny("clip_prompt", 64, "n_prompts=0").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images, "photo")["embedding"], encoder.clip.encode_image(images))


@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_clip_prompts_are_per_domain(depth):
    encoder = tiny("clip_prompt", 32, f"prompt_depth={depth}", "n_prompts=4").eval()
    layers = len(encoder.clip.visual.transformer.resblocks)
    assert encoder.sketch_prompts.shape == ((layers if depth == "deep" else 1), 4, 64)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        sketch, photo = encoder(images, "sketch")["embedding"], encoder(images, "photo")["embedding"]
        assert not torch.allclose(sketch, photo)
        encoder.photo_prompts.copy_(encoder.sketch_prompts)
        torch.testing.assert_close(encoder(images, "photo")["embedding"], sketch)
    if depth == "deep":  # the later prompts reach the output
        with torch.no_grad():
            encoder.sketch_prompts[-1].add_(1.0)
            assert not torch.allclose(encoder(images, "sketch")["embedding"], sketch)


def test_clip_shared_prompts_are_one_parameter_for_both_domains():
    """Sketch_LVM's fine-grained model: one common prompt set, trained by sketches and photos alike."""
    encoder = tiny("clip_prompt", 32, "shared_prompts=true").eval()
    assert encoder.photo_prompts is None
    assert _trainable(encoder) == {"sketch_prompts"} | LAYER_NORMS
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images, "photo")["embedding"], encoder(images, "sketch")["embedding"])
    encoder(images, "photo")["embedding"].sum().backward()
    assert encoder.sketch_prompts.grad is not None and encoder.sketch_prompts.grad.abs().sum() > 0
    groups = {g["name"]: g["params"] for g in encoder.param_groups(lr=0.5)}
    assert [p is encoder.sketch_prompts for p in groups["prompts"]] == [True]
    assert "photo_prompts" not in encoder.state_dict() and "sketch_prompts" in encoder.state_dict()


def test_clip_text_embeddings_are_cached_frozen_and_clean_names():
    encoder = tiny("clip_prompt", 32)
    calls = []
    encode_text = encoder.clip.encode_text

    def counting(*args, **kwargs):
        calls.append(1)
        return encode_text(*args, **kwargs)

    encoder.clip.encode_text = counting
    names = ["tree_frog", "hot-air_balloon", "cat"]
    first = encoder.text_embeddings(names)
    second = encoder.text_embeddings(names)
    assert len(calls) == 1 and second is first
    assert first.shape == (3, 512) and not first.requires_grad
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(3))
    spaced = encoder.text_embeddings(["tree frog", "hot air balloon", "cat"])
    assert len(calls) == 1 and spaced is first  # the same texts: "_" and "-" read as spaces
    other_template = tiny("clip_prompt", 32)
    other_template.text_template = "a sketch of a {}"
    assert not torch.allclose(other_template.text_embeddings(names), encoder.text_embeddings(names))
    assert not any(p.requires_grad for p in encoder.clip.transformer.parameters())
    assert not encoder.clip.token_embedding.weight.requires_grad and not encoder.clip.logit_scale.requires_grad
    assert encoder.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)
    encoder.to(torch.float64)  # a module move: the cache follows the module's device and dtype
    moved = encoder.text_embeddings(names)
    assert len(calls) == 1 and moved.dtype == torch.float64
    torch.testing.assert_close(moved, first.double())


def test_clip_real_size_trainable_counts():
    encoder = build_encoder(model_cfg("clip_prompt", "pretrained=null", "image_size=224"), NUM_CLASSES)
    total, trainable = encoder.num_parameters()
    prompts = 2 * 3 * 768
    layer_norms = 2 * 768 * (2 + 2 * 12)  # ln_pre, ln_post, ln_1 and ln_2 of 12 blocks
    assert trainable == prompts + layer_norms == 44_544
    assert total == 151_277_313 + prompts
    out = encoder(torch.randn(1, 3, 224, 224), "sketch")
    assert out["embedding"].shape == (1, 512) and out["tokens"].shape == (1, 49, 768)


def test_clip_embed_dim_must_match_the_model():
    with pytest.raises(ValueError, match="embed_dim"):
        build_encoder(model_cfg("clip_prompt", "pretrained=null", "embed_dim=256"), NUM_CLASSES)
