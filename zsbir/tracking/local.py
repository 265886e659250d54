"""Experiment tracking: a local JSON-lines log always, Weights & Biases when asked.

`logger=none` (default) writes `<run_dir>/log.jsonl` only; `logger=wandb`
(`zsbir.tracking_wandb`) writes the same file and a W&B run. The trainer calls the tracker
on rank 0 only; `zsbir.train` finishes it with a non-zero exit code when a run fails.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from zsbir.errors import ZsbirError


def plain_value(value):
    """A JSON-friendly scalar: tensors and numpy numbers become Python numbers, NaN/Inf strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    """Local tracker: every call appends one JSON line to `log.jsonl`."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "log.jsonl"

    def _write(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **{k: plain_value(v) for k, v in record.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def log(self, values: dict, step: int) -> None:
        self._write({"step": step, **values})

    def summary(self, values: dict) -> None:
        self._write({"summary": {k: plain_value(v) for k, v in values.items()}})

    def log_images(self, name: str, paths: list[Path], step: int) -> None:
        self._write({"step": step, "images": {name: [str(p) for p in paths]}})

    def state_dict(self) -> dict:
        return {}

    def finish(self, exit_code: int = 0) -> None:
        """End of the run; `exit_code` != 0 marks a failed run. Calling it twice is harmless."""


def build_tracker(logger_cfg, cfg, run_dir: Path, resume_state: dict | None = None) -> Tracker:
    name = str(logger_cfg.get("name", "none")) if logger_cfg else "none"
    if name == "none":
        return Tracker(run_dir)
    if name == "wandb":
        from zsbir.tracking_wandb import WandbTracker

        return WandbTracker(logger_cfg, cfg, run_dir, resume_state or {})
    raise ZsbirError(f"unknown logger.name {name!r}: use logger=none or logger=wandb")
