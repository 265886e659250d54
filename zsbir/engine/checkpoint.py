"""Crash-safe checkpoints: written to a temporary file in the same folder, then renamed.

A crash in the middle of a write leaves the previous file intact: `os.replace` is atomic
on POSIX file systems, the temporary file is removed on failure, and one left behind by a
killed process is removed by `remove_stale_temporaries` when the run resumes. Checkpoints
are read with `torch.load(weights_only=True)`, which refuses arbitrary pickled objects.
"""
from __future__ import annotations

import errno
import logging
import os
import secrets
from pathlib import Path

import torch

from zsbir.errors import ZsbirError

log = logging.getLogger(__name__)


class CheckpointError(ZsbirError):
    """A checkpoint cannot be used; the message says why and what to do."""


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable (survives a power loss), where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind `err`: torch.save reports a failed write (disk full) as a RuntimeError."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def save_atomic(state: dict, path: str | os.PathLike) -> None:
    """Write `state` to `path` so that a reader sees either the old or the new file, never half of one."""
    _write_atomic(Path(path), lambda handle: torch.save(state, handle), "checkpoint")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """A result file (metrics.json, results.txt) written like a checkpoint: all of it or the old one."""
    _write_atomic(Path(path), lambda handle: handle.write(text.encode()), "result file")


def _write_atomic(path: Path, write, what: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        # os.open with 0o666 honours the umask (tempfile.mkstemp would make the file private).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        os_error = _os_error_in(err)
        if os_error is None:
            raise
        hint = " The disk is full: free space or move the run." if os_error.errno == errno.ENOSPC else ""
        raise CheckpointError(
            f"could not write {what} {path}: {os_error}.{hint} The previous {path.name}, if any, is unchanged"
        ) from err
    _fsync_directory(path.parent)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint files left by a process killed in the middle of a write."""
    stale = sorted(Path(folder).glob(".*.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished checkpoint write(s) of a killed run: %s", len(stale), [p.name for p in stale])
    return stale


def load_checkpoint(path: str | os.PathLike, map_location="cpu",
                    fix: str = "delete it (or move it away) to start the run over") -> dict:
    """`fix` ends the message for an unloadable file: what the caller's user should do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...
        raise CheckpointError(
            f"cannot load checkpoint {path}: {err}. It may be truncated or not a zsbir checkpoint; {fix}"
        ) from err


# ---------------------------------------------------------------------------- format and fingerprint
# A checkpoint is a dict with `format`, `fingerprint`, `config`, `model` (the encoder's
# state) and the training state the Trainer adds (optimizer, scheduler, step, RNG, ...).
# Training (resume, best.pt for the final test) and `python -m zsbir.eval` read it only
# through the functions below.
CHECKPOINT_FORMAT = 1


def fingerprint(cfg, loss_terms, dataset: str, seen_classes: int) -> dict:
    """What a checkpoint must match to be loaded into a run: model config, loss terms, data."""
    from omegaconf import OmegaConf

    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "loss_terms": sorted(loss_terms),
        "dataset": dataset,
        "seen_classes": int(seen_classes),
    }


def checkpoint_state(fingerprint_: dict, cfg, encoder_state: dict, **training_state) -> dict:
    """The dict written as best.pt / last.pt."""
    from omegaconf import OmegaConf

    return {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint_,
            "config": OmegaConf.to_container(cfg, resolve=True), "model": encoder_state, **training_state}


def check_format(state: dict, path: Path) -> None:
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "fingerprint" not in state \
            or "model" not in state:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a zsbir training checkpoint of format {CHECKPOINT_FORMAT} (found "
                              f"{found!r}); pass a best.pt / last.pt written by zsbir.train")


def check_fingerprint(state: dict, ours: dict, path: Path, hint: str) -> None:
    """Raise CheckpointError naming every fingerprint key (of `ours`) the checkpoint differs in."""
    check_format(state, path)
    theirs = state["fingerprint"]
    diffs = changed_keys({k: theirs.get(k) for k in ours}, ours, before="checkpoint ", after="config ")
    if diffs:
        raise CheckpointError(f"{path} was written by a different model or config ({'; '.join(diffs)}). {hint}")


def changed_keys(old: dict, new: dict, prefix: str = "", before: str = "", after: str = "") -> list[str]:
    """`key: <before>old -> <after>new` for every dotted key whose value differs between two plain dicts."""
    changed = []
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_keys(a, b, path + ".", before, after)
        elif a != b:
            changed.append(f"{path}: {before}{a!r} -> {after}{b!r}")
    return changed
