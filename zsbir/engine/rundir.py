"""Claiming a run directory: one process at a time, and never over an earlier run by accident.

Kept free of torch imports: `RunDirectoryCallback` runs in Hydra's `on_run_start`, before
Hydra writes `.hydra/` and `train.log` into the run directory, so a second launch into a
running directory stops in well under a second without touching the running job's files.
"""
from __future__ import annotations

import fcntl
import logging
import os
import sys
from pathlib import Path
from typing import Any

from zsbir.errors import ZsbirError

log = logging.getLogger(__name__)

RESULT_FILES = ("last.pt", "best.pt", "metrics.json")
# Locks this process holds: real path of the lock file -> [fd, holders]. flock conflicts between
# two open files of the same process too, so the trainer reuses the lock the entry point took.
_HELD: dict[str, list[int]] = {}


class RunDirectoryBusyError(ZsbirError):
    """Another process is training in the same run directory."""


class RunDirectoryInUseError(ZsbirError):
    """A fresh run (trainer.resume=false) was started in a directory holding an earlier run's results."""


class RunDirectoryError(ZsbirError):
    """The run directory cannot be created or written."""


class RunDirectoryLock:
    """An exclusive lock on a run directory, held while a process trains in it.

    A requeued job that starts while the old one is still saving, or the same command
    launched twice, would otherwise interleave two trainings in one `last.pt`. The lock is
    an advisory `flock` on `<run dir>/.lock`; the kernel releases it when the process dies,
    so a killed run never leaves a stale lock. File systems without flock support skip it.
    Re-entrant within one process.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self.key: str | None = None

    def acquire(self) -> None:
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            self.key = key
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryBusyError(
                f"another process (pid {holder}) is training in {self.path.parent}. Wait for it to finish "
                "(re-running the same command afterwards resumes from last.pt), stop it, or pass another "
                "hydra.run.dir"
            ) from None
        except OSError as err:  # e.g. ENOLCK on a network file system without lock support
            os.close(fd)
            log.warning("cannot lock %s (%s): not protected against a second process using it", self.path, err)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[key] = [fd, 1]
        self.key = key

    def release(self) -> None:
        if self.key is None:
            return
        held = _HELD[self.key]
        held[1] -= 1
        if held[1] == 0:
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])
            del _HELD[self.key]
        self.key = None


def refuse_fresh_run_over_results(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """trainer.resume=false must not silently replace an earlier run's checkpoints and metrics."""
    if resume or overwrite:
        return
    found = [name for name in RESULT_FILES if (Path(run_dir) / name).exists()]
    if found:
        raise RunDirectoryInUseError(
            f"trainer.resume=false but {run_dir} holds an earlier run's {', '.join(found)}, which a fresh run would "
            "overwrite. Start it in another directory (hydra.run.dir=<new folder>), or pass "
            "trainer.overwrite=true to replace them"
        )


def claim_run_directory(run_dir: Path) -> RunDirectoryLock:
    """Create `run_dir` and lock it; a one-line RunDirectoryError when it cannot be used."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunDirectoryLock(run_dir)
        lock.acquire()
    except (FileExistsError, NotADirectoryError):
        raise RunDirectoryError(f"run directory {run_dir} cannot be created: it, or a folder above it, is a "
                                "file. Pass hydra.run.dir=<a folder>") from None
    except PermissionError as err:
        raise RunDirectoryError(f"run directory {run_dir} is not writable ({err.strerror}). Pass "
                                "hydra.run.dir=<a folder you can write to>, or fix its permissions") from None
    except OSError as err:
        raise RunDirectoryError(f"cannot use run directory {run_dir}: {err.strerror or err}. Pass "
                                "hydra.run.dir=<another folder>") from None
    return lock


def _callback_base():
    from hydra.experimental.callback import Callback

    return Callback


class RunDirectoryCallback(_callback_base()):
    """Hydra callback (single runs): claim `hydra.run.dir` before Hydra writes anything into it.

    The lock stays held for the life of the process; the trainer's own lock reuses it.
    A refusal is one line on stderr and exit code 1.
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir)).expanduser().absolute()
        try:
            trainer = config.get("trainer") or {}
            self.lock = claim_run_directory(run_dir)
            refuse_fresh_run_over_results(run_dir, bool(trainer.get("resume", True)), bool(trainer.get("overwrite")))
        except ZsbirError as err:
            print(f"{type(err).__name__}: {err}", file=sys.stderr)
            sys.exit(1)
