"""Measurement stand-ins for tests/test_gpubench.py: they fail, hang or read the report on purpose."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from zsbir.gpubench.worker import SkipItem


def record_then_raise(rec) -> None:
    rec.put("before the error", 1)
    raise ValueError("broken on purpose")


def record_then_hang(rec) -> None:
    helper = subprocess.Popen(["sleep", "120"])  # a process of its own, like a DataLoader worker
    rec.put("pids", {"item": os.getpid(), "helper": helper.pid})
    time.sleep(120)


def skip(rec) -> None:
    raise SkipItem("does not apply here")


def read_report(rec, out: str) -> None:
    report = json.loads((Path(out) / "report.json").read_text())
    rec.put("statuses", {s["key"]: s["status"] for s in report["sections"]})
    rec.put("markdown written", (Path(out) / "report.md").is_file())
