"""Crash-safe checkpoints: written to a temporary file in the same folder, then renamed.

A crash in the middle of a write leaves the previous file intact: `os.replace` is atomic
on POSIX file systems, and the temporary file is removed on failure. Checkpoints are read
with `torch.load(weights_only=True)`, which refuses arbitrary pickled objects.
"""
from __future__ import annotations

from zsbir.errors import ZsbirError

import os
import tempfile
from pathlib import Path

import torch


class CheckpointError(ZsbirError):
    """A checkpoint cannot be used; the message says why and what to do."""


def save_atomic(state: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...
        raise CheckpointError(
            f"cannot load checkpoint {path}: {err}. It may be truncated or not a zsbir checkpoint; "
            "delete it to start over, or pass another one"
        ) from err
