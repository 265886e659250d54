"""Which device a job runs on and which autocast precision it uses (training and evaluation)."""
from __future__ import annotations

import torch

from zsbir.errors import ConfigError


def pick_device(requested: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; an explicit `cuda` without a GPU is a config error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={requested} but no CUDA device is available; use trainer.device=auto or cpu")
    return device


def amp_dtype(precision: str, device: torch.device):
    """The autocast dtype of `precision` (fp32 | bf16 | fp16) on `device`; None: no autocast (fp32, or CPU)."""
    if precision == "fp32" or device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
