"""Experiment tracking: a local JSON-lines log always, Weights & Biases when asked.

The tracker is the `_target_` of configs/logger/<name>.yaml, built with the run directory,
the whole config and the state a resumed run saved: `logger=none` (default) is
`zsbir.tracking.local.Tracker` (`<run_dir>/log.jsonl` only); `logger=wandb` is
`zsbir.tracking.wandb.WandbTracker` (the same file and a W&B run). A new backend is one
module here and one config file. The trainer calls the tracker on rank 0 only;
`zsbir.train` finishes it with a non-zero exit code when a run fails.
"""
from __future__ import annotations

from pathlib import Path

from zsbir.tracking.local import Tracker, plain_value

__all__ = ["Tracker", "build_tracker", "plain_value"]


def build_tracker(logger_cfg, cfg, run_dir: Path, resume_state: dict | None = None) -> Tracker:
    """Instantiate `logger._target_`; no logger group at all means the local tracker."""
    if not logger_cfg:
        return Tracker(run_dir)
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(logger_cfg, resolve=True)
    settings.pop("name", None)
    tracker_class = get_class(settings.pop("_target_"))
    # Not hydra's instantiate: it would merge `cfg` into the logger node and break its interpolations.
    return tracker_class(run_dir=Path(run_dir), cfg=cfg, resume_state=resume_state or {}, **settings)
