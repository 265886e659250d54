"""What a run directory records about where and how it ran."""
from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("zsbir", "torch", "torchvision", "timm", "open_clip_torch", "hydra-core", "omegaconf", "wandb", "numpy", "pillow")


def git_commit(start: Path) -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=start, capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown (not a git checkout)", "dirty": None}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_run_info(run_dir: Path) -> dict:
    import zsbir

    info = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "git": git_commit(Path(zsbir.__file__).resolve().parent),
        "packages": package_versions(),
    }
    from zsbir.engine.checkpoint import write_text_atomic

    write_text_atomic(run_dir / "run_info.json", json.dumps(info, indent=2))
    return info
