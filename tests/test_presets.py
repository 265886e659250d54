"""Method presets: they compose, carry the papers' settings, and train with data=synthetic debug=smoke."""
from __future__ import annotations

import pytest
import torch

PRESETS = ("dann", "sake", "dsn", "sketch_lvm")
# The paper's prompt lr (1e-4) moves the tiny random CLIP's loss by ~1e-5 per step; a larger
# one makes the decrease unambiguous while exercising the same losses and trainable set.
FAST_LR = {"sketch_lvm": ("model.prompt_lr=1e-2", "model.ln_lr=1e-2")}


def fixed_batch(trainer) -> dict:
    trainer.sampler.set_epoch(0)
    return next(iter(trainer.train_loader))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_total_loss_goes_down_on_a_fixed_batch(preset, compose_cfg, tmp_path):
    from zsbir.engine.trainer import Trainer

    # max_steps only stretches the learning-rate schedule (SAKE's decays 1000x over the run).
    cfg = compose_cfg(f"experiment={preset}", "data=synthetic", "debug=smoke", "trainer.max_steps=200",
                      "trainer.device=cpu", *FAST_LR.get(preset, ()))
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.loss_set.on_train_start(trainer.ctx, trainer.data.seen_classes)
    batch = fixed_batch(trainer)
    losses = []
    for _ in range(8):
        logs = trainer.train_step(batch)
        trainer.step += 1
        losses.append(float(logs["loss"]))
        assert set(trainer.loss_set.terms) <= {k.removeprefix("loss/") for k in logs}  # every term logged
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.99 * losses[0], f"{preset}: total loss {losses}"


def test_presets_set_the_papers_settings(compose_cfg):
    dann = compose_cfg("experiment=dann")
    assert dann.method == "dann" and dann.model.name == "resnet50"
    assert list(dann.loss) == ["triplet", "domain_grl"]
    assert (dann.loss.triplet.distance, dann.loss.triplet.margin) == ("euclidean", 1.0)
    assert dann.loss.domain_grl.in_dim == dann.model.embed_dim

    sake = compose_cfg("experiment=sake")
    assert sake.model.name == "cse_resnet50" and sorted(sake.loss) == ["ce", "distill"]
    assert (sake.loss.distill.lambda_kd, sake.loss.distill.kdneg) == (1.0, 0.3)
    assert (sake.optim.lr, sake.optim.weight_decay, sake.sched.name, sake.sched.final_ratio) == (1e-4, 5e-4, "exp", 1e-3)
    assert (sake.trainer.max_epochs, sake.data.image_size, sake.data.augment, sake.model.norm) == (20, 224, "sake", "imagenet")

    dsn = compose_cfg("experiment=dsn")
    assert sorted(dsn.loss) == ["ce", "contrastive", "distill", "memory"]
    assert (dsn.loss.contrastive.weight, dsn.loss.contrastive.temperature) == (0.1, 0.07)
    assert (dsn.loss.memory.weight, dsn.loss.memory.slots, dsn.loss.memory.feature) == (1.0, 10, "pooled")
    assert (dsn.data.augment, dsn.data.augment_views, dsn.data.sampler) == ("sake", "dsn", "streams")
    assert (dsn.data.stream_batch.sketch, dsn.data.stream_batch.photo) == (32, 64)  # Sketchy: 96 // 3, 96 // 3 * 2

    lvm = compose_cfg("experiment=sketch_lvm")
    assert lvm.model.name == "clip_prompt" and lvm.model.arch == "ViT-B-32-quickgelu"
    assert (lvm.model.prompt_lr, lvm.model.ln_lr, lvm.model.norm) == (1e-4, 1e-6, "clip")
    assert (lvm.loss.triplet.distance, lvm.loss.triplet.margin) == ("cosine", 0.2)
    assert lvm.model.text_template == "a photo of a {}" and lvm.data.batch_size == 192
    assert (lvm.eval.protocol, dsn.eval.per_class, sake.eval.protocol) == ("plain", True, "voc")


def test_loss_weights_are_overridable_from_the_command_line(compose_cfg):
    cfg = compose_cfg("loss=[triplet,domain_grl]", "loss.domain_grl.weight=0.5")
    from zsbir.losses import build_loss_set

    cfg.loss.domain_grl.in_dim = 16
    loss_set = build_loss_set(cfg.loss)
    assert loss_set.weights == {"triplet": 1.0, "domain_grl": 0.5}


def test_dsn_run_logs_every_term_and_resumes_its_memory(compose_cfg, tmp_path):
    import json

    from zsbir.engine.checkpoint import load_checkpoint
    from zsbir.engine.trainer import Trainer

    cfg = compose_cfg("experiment=dsn", "data=synthetic", "debug=smoke", "trainer.device=cpu",
                      "eval.before_training=false")
    run_dir = tmp_path / "run"
    trainer = Trainer(cfg, run_dir)
    trainer.fit()
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == trainer.total_steps  # debug=smoke logs every step
    assert all({"loss/ce", "loss/distill", "loss/contrastive", "loss/memory"} <= set(r) for r in steps)

    memory = trainer.loss_set.terms["memory"]
    assert int(memory.writes.sum()) == trainer.total_steps * cfg.data.stream_batch.sketch  # every sketch stored
    saved = load_checkpoint(run_dir / "last.pt")["losses"]
    assert torch.equal(saved["terms.memory.bank"], memory.bank)
    resumed = Trainer(cfg, run_dir)  # same directory: resumes from last.pt
    assert resumed.step == trainer.step
    assert torch.equal(resumed.loss_set.terms["memory"].bank, memory.bank)
    assert torch.equal(resumed.loss_set.terms["memory"].writes, memory.writes)
