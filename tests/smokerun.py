"""A tiny trained run (debug=smoke, one epoch) for the tests of the commands that read a run."""
from __future__ import annotations

from pathlib import Path

SMOKE = ["debug=smoke", "trainer.max_epochs=1", "eval.before_training=false", "eval.grids.queries=0"]


def train_smoke_run(out: Path, *overrides: str) -> Path:
    from hydra import compose, initialize_config_dir

    from zsbir._paths import config_dir
    from zsbir.train import run

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out}", *SMOKE, *overrides])
    run(cfg, str(out / "run"))
    return out / "run"


def fixed_batch_losses(trainer, steps: int = 8) -> tuple[list[float], list[dict]]:
    """Train `steps` steps on the loader's first batch; (total losses, each step's logs).

    The "loss goes down on a fixed batch" check of every preset: the trainer's own step, with its
    auxiliary passes and all loss terms, repeated on one batch."""
    trainer.loss_set.on_train_start(trainer.ctx, trainer.data.seen_classes)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    losses, history = [], []
    for _ in range(steps):
        logs = trainer.train_step(batch)
        trainer.step += 1
        losses.append(float(logs["loss"]))
        history.append(logs)
    return losses, history
