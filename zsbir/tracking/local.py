"""The local tracker: every record as one JSON line of `<run_dir>/log.jsonl` (`logger=none`)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


def plain_value(value):
    """A JSON-friendly scalar: tensors and numpy numbers become Python numbers, NaN/Inf strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    """Local tracker: every call appends one JSON line to `log.jsonl`."""

    def __init__(self, run_dir: Path, cfg=None, resume_state: dict | None = None):
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
