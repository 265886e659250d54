"""One measurement in its own process (`child_main`, started by runner.py from a fork server).

The job file names a function (`module:function`), its keyword arguments and a records
file. The function gets a `Recorder` as first argument and calls `rec.put(name, value)`
whenever a figure is ready; each call appends one JSON line and flushes it, so the figures
measured before a time cap kills the process are kept. Exit status: 0 done, 1 error (the
last line holds it), 3 skipped (`SkipItem`). Only the standard library is imported at the
top: the fork server preloads the heavy modules (`PRELOAD`) once, so each measurement
starts in milliseconds instead of importing torch again.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback

# Imported once by the fork server; every measurement process is forked from it with these loaded.
PRELOAD = ["torch", "timm", "open_clip", "hydra", "zsbir.engine.trainer", "zsbir.eval.metrics", "zsbir.data.prepare"]

EXIT_ERROR, EXIT_SKIPPED = 1, 3


class SkipItem(Exception):
    """The measurement does not apply here (the message says why); not an error."""


class Recorder:
    def __init__(self, path: str):
        self.path = path

    def put(self, name: str, value) -> None:
        self._write({"record": name, "value": value})

    def _write(self, line: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def run_job(job_path: str) -> int:
    with open(job_path) as handle:
        job = json.load(handle)
    rec = Recorder(job["records"])
    try:
        if job.get("torch_threads"):
            import torch

            torch.set_num_threads(int(job["torch_threads"]))
        module_name, _, function_name = job["target"].partition(":")
        function = getattr(importlib.import_module(module_name), function_name)
        function(rec, **job.get("params", {}))
    except SkipItem as reason:
        rec._write({"skipped": str(reason)})
        return EXIT_SKIPPED
    except BaseException as err:  # noqa: BLE001 - every failure must reach the report
        traceback.print_exc()
        rec._write({"error": f"{type(err).__name__}: {err}".strip()})
        return EXIT_ERROR
    finally:
        rec._write({"cpu_s": round(_cpu_seconds(), 1)})
    return 0


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (loader workers): the wall time on an idle core."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child_main(job_path: str, log_path: str, env: dict[str, str]) -> None:
    """Entry point of a measurement process: own process group, own log, the item's environment."""
    os.setsid()  # the runner kills the whole group at the cap: loader workers and compile workers too
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.update(env)
    _exit_with_parent()
    code = run_job(job_path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (CUDA, process pools): the records are already on disk


def _exit_with_parent() -> None:
    """Kill this process group when the process that forked it goes (a killed run leaves no GPU job behind)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
