"""Trainer speed options: frozen parameters, channels_last, torch.compile checkpoints,
gradient checkpointing, fused optimizers, and GPU-side augmentation (run here on CPU)."""
from __future__ import annotations

import pytest
import torch

from zsbir.data.gpu_augment import GPUAugment
from zsbir.data.transforms import build_transform
from zsbir.engine.checkpoint import load_checkpoint
from zsbir.engine.optim import build_optimizer
from zsbir.engine.trainer import Trainer
from zsbir.models.encoder import UnsupportedModelOption, build_encoder
from zsbir.train import run

SMOKE = ["debug=smoke", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "eval.before_training=false"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def first_batch(trainer: Trainer) -> dict:
    trainer.sampler.set_epoch(0)
    return next(iter(trainer.train_loader))


def gradients_of_one_step(trainer: Trainer, batch: dict) -> dict[str, torch.Tensor]:
    batch = trainer._prepare_batch(batch)
    total, _ = trainer.forward_step(batch)
    total.backward()
    return {name: p.grad.clone() for name, p in trainer.encoder.named_parameters() if p.grad is not None}


def assert_same_gradients(got: dict, expected: dict) -> None:
    """Equal up to float32 summation order (convolution algorithms differ by memory format)."""
    assert got.keys() == expected.keys() and expected
    scale = max(float(g.abs().max()) for g in expected.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-4 * scale, msg=name)


def test_frozen_parameters_are_not_optimised_and_get_no_gradient(compose_cfg, tmp_path):
    cfg = compose_cfg(*SMOKE, "model=clip_prompt", "model.trainable=prompts")
    trainer = Trainer(cfg, tmp_path / "run")
    frozen = {n: p for n, p in trainer.encoder.named_parameters() if not p.requires_grad}
    assert frozen and len(frozen) < len(list(trainer.encoder.parameters()))
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in frozen.values()}
    trainer.train_step(first_batch(trainer))
    assert all(p.grad is None for p in frozen.values())
    assert all(p.grad is not None for n, p in trainer.encoder.named_parameters() if p.requires_grad)


def test_channels_last_gives_the_same_gradients(compose_cfg, tmp_path):
    plain = Trainer(compose_cfg(*SMOKE), tmp_path / "plain")
    fast = Trainer(compose_cfg(*SMOKE, "trainer.channels_last=true"), tmp_path / "fast")
    conv = fast.encoder.photo_backbone.conv1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    batch = first_batch(plain)
    expected, got = gradients_of_one_step(plain, batch), gradients_of_one_step(fast, batch)
    assert expected.keys() == got.keys()
    assert_same_gradients(got, expected)


def test_compiled_training_writes_checkpoints_that_load_without_compile(compose_cfg, tmp_path):
    # The eager backend exercises the compile wrapper in seconds; inductor is the same wrapper.
    result = run(compose_cfg(*SMOKE, "trainer.compile=true", "trainer.compile_backend=eager"), str(tmp_path / "run"))
    assert result["steps"] == 2
    state = load_checkpoint(tmp_path / "run" / "best.pt")["model"]
    assert not [k for k in state if "_orig_mod" in k]
    plain = build_encoder(compose_cfg(*SMOKE).model, 60)
    plain.load_state_dict(state)  # strict: every key matches the uncompiled model


# small_cnn with plain BatchNorm: its default domain-specific BatchNorm refuses checkpointing (test_dsbn.py)
@pytest.mark.parametrize("model", ["clip_prompt", "puxim", "small_cnn model.dsbn=null"])
def test_gradient_checkpointing_gives_the_same_gradients(compose_cfg, tmp_path, model):
    model = [f"model={model.split()[0]}", *model.split()[1:]]
    plain = Trainer(compose_cfg(*SMOKE, *model), tmp_path / "plain")
    checkpointed = Trainer(compose_cfg(*SMOKE, *model, "trainer.grad_checkpointing=true"), tmp_path / "ckpt")
    batch = first_batch(plain)
    expected, got = gradients_of_one_step(plain, batch), gradients_of_one_step(checkpointed, batch)
    assert_same_gradients(got, expected)


def test_gradient_checkpointing_on_a_model_without_it_is_a_clear_error(compose_cfg, tmp_path):
    with pytest.raises(UnsupportedModelOption, match="trainer.grad_checkpointing=false"):
        Trainer(compose_cfg(*SMOKE, "model=cse_resnet50", "trainer.grad_checkpointing=true"), tmp_path / "run")


def test_fused_optimizer_is_requested_only_where_it_exists(compose_cfg):
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-3}]
    assert build_optimizer(compose_cfg("optim=adamw").optim, params, fused=True).defaults["fused"] is True
    assert not build_optimizer(compose_cfg("optim=adam").optim, params).defaults.get("fused")


@needs_cuda
def test_fused_optimizer_on_cuda(compose_cfg, tmp_path):
    trainer = Trainer(compose_cfg(*SMOKE, "trainer.device=cuda"), tmp_path / "run")
    assert trainer.optimizer.defaults["fused"] is True
    trainer.train_step(first_batch(trainer))


# ---------------------------------------------------------------- GPU-side augmentation
def uint8_images(n: int = 6, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_gpu_augment_without_a_recipe_equals_the_cpu_normalisation():
    from PIL import Image

    images = uint8_images()
    ours = GPUAugment("none", "clip", seed=0)(images, "photo", epoch=0, indices=torch.arange(6), stream=0)
    cpu = build_transform("photo", 32, "clip", train=False)
    expected = torch.stack([cpu(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in images])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_both_executors_run_the_one_recipe_description(monkeypatch):
    """A recipe's parameters live in data/augment_recipes.py only: a change there reaches the PIL and the GPU path."""
    from PIL import Image

    from zsbir.data import augment_recipes
    from zsbir.data.augment_recipes import Affine, Recipe

    images = uint8_images()
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
    plain = torch.stack([build_transform("photo", 32, "imagenet", train=False)(p) for p in pil])

    def both(recipe: str) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        cpu = torch.stack([build_transform("photo", 32, "imagenet", recipe, train=True)(p) for p in pil])
        return cpu, GPUAugment(recipe, "imagenet", seed=0)(images, "photo", 0, torch.arange(6), stream=0)

    assert not any(torch.allclose(out, plain) for out in both("sake"))  # flip + affine (p = 0.7) move pixels
    monkeypatch.setitem(augment_recipes.RECIPES, "sake", Recipe(affine=Affine(p=0.0)))  # an affine never applied
    for out in both("sake"):
        torch.testing.assert_close(out, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("recipe", ["flip", "sake", "dsn", "clip"])
def test_gpu_augment_is_seeded_per_sample(recipe):
    augment = GPUAugment(recipe, "imagenet", seed=7)
    images, indices = uint8_images(), torch.tensor([4, 9, 1, 30, 2, 5])
    first = augment(images, "photo", 3, indices, stream=1)
    assert first.shape == (6, 3, 32, 32) and first.dtype == torch.float32 and torch.isfinite(first).all()
    torch.testing.assert_close(augment(images, "photo", 3, indices, stream=1), first, rtol=0, atol=0)
    # A sample's result depends on its own index only, not on the rest of the batch.
    torch.testing.assert_close(augment(images[2:3], "photo", 3, indices[2:3], stream=1), first[2:3], rtol=0, atol=1e-6)
    assert not torch.equal(augment(images, "photo", 4, indices, stream=1), first)  # new epoch, new draws


def test_gpu_augment_affine_fills_sketch_borders_with_white():
    white = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    out = GPUAugment("sake", "half", seed=0)(white, "sketch", 0, torch.arange(64), stream=0)
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-5)  # white stays white after any warp


def test_gpu_augment_training_run(compose_cfg, tmp_path):
    cfg = compose_cfg(*SMOKE, "data.gpu_augment=true", "data.augment=dsn")
    trainer = Trainer(cfg, tmp_path / "run")
    batch = first_batch(trainer)
    assert batch["sketch"].dtype == torch.uint8  # the loader leaves augmentation to the device
    assert torch.isfinite(trainer.train_step(batch)["loss"])


@needs_cuda
def test_gpu_augment_on_cuda_matches_cpu_draws():
    images, indices = uint8_images(), torch.arange(6)
    augment = GPUAugment("dsn", "imagenet", seed=1)
    torch.testing.assert_close(augment(images.cuda(), "photo", 0, indices, 0).cpu(),
                               augment(images, "photo", 0, indices, 0), rtol=1e-4, atol=1e-4)


@needs_cuda
def test_bf16_channels_last_step_on_cuda(compose_cfg, tmp_path):
    trainer = Trainer(compose_cfg(*SMOKE, "trainer.device=cuda", "trainer.channels_last=true",
                                  "trainer.precision=bf16"), tmp_path / "run")
    assert torch.isfinite(trainer.train_step(first_batch(trainer))["loss"])


def test_bench_train_prints_both_variants_the_ratio_and_the_loader(capsys):
    from zsbir.bench import main

    assert main(["train", "model=small_cnn", "device=cpu", "batch_size=4", "image_size=32", "steps=1", "warmup=1",
                 "loader_batches=1", "compile=false", "data.max_per_class=4"]) == 0
    out = capsys.readouterr().out
    assert "speed options" in out and "plain fp32" in out and "channels_last=True" in out
    assert "speed-up (speed options / plain fp32):" in out and "data pipeline:" in out and "peak RSS" in out
