"""Experiment tracking: a local JSON-lines log always, Weights & Biases when asked.

`logger=none` (default) writes `<run_dir>/log.jsonl` only; other loggers add to it. The
trainer calls the tracker on rank 0 only.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


def _plain(value):
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
        record = {"time": round(time.time(), 3), **{k: _plain(v) for k, v in record.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def log(self, values: dict, step: int) -> None:
        self._write({"step": step, **values})

    def summary(self, values: dict) -> None:
        self._write({"summary": {k: _plain(v) for k, v in values.items()}})

    def log_images(self, name: str, paths: list[Path], step: int) -> None:
        self._write({"step": step, "images": {name: [str(p) for p in paths]}})

    def state_dict(self) -> dict:
        return {}

    def finish(self) -> None:
        pass


def build_tracker(logger_cfg, cfg, run_dir: Path, resume_state: dict | None = None) -> Tracker:
    name = str(logger_cfg.get("name", "none")) if logger_cfg else "none"
    if name == "none":
        return Tracker(run_dir)
    if name == "wandb":
        from zsbir.tracking_wandb import WandbTracker

        return WandbTracker(logger_cfg, cfg, run_dir, resume_state or {})
    raise ValueError(f"unknown logger {name!r}: use logger=none or logger=wandb")
