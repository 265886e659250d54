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
