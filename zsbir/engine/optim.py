"""Optimizers from the `optim` group and learning-rate schedules from the `sched` group.

Schedules are per optimisation step: a linear warmup, then `cosine` (to
`min_lr_ratio`), `exp` (SAKE's lr_e = lr * final_ratio^(e/E), applied per step) or
`constant`. Every parameter group keeps its own base lr (prompts vs LayerNorms).
"""
from __future__ import annotations

import inspect
import math

import torch
from hydra.utils import get_class

from zsbir.choices import LR_SCHEDULES as SCHEDULES
from zsbir.instantiate import build_from_config, plain_node


def build_optimizer(optim_cfg, param_groups: list[dict], fused: bool = False) -> torch.optim.Optimizer:
    """The `optim` config's optimizer; `fused` selects the single-kernel implementation where it has one."""
    if not param_groups:
        raise ValueError("nothing to train: every parameter is frozen (check model.trainable)")
    cfg = plain_node(optim_cfg)
    if fused and "fused" in inspect.signature(get_class(cfg["_target_"])).parameters:
        cfg["fused"] = True
    return build_from_config(cfg, params=param_groups)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float, final_ratio: float) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "exp":
        return final_ratio**progress
    return 1.0


def build_scheduler(sched_cfg, optimizer: torch.optim.Optimizer, total_steps: int):
    kind = str(sched_cfg.name)
    if kind not in SCHEDULES:
        raise ValueError(f"sched.name must be one of {SCHEDULES}, got {kind!r}")
    warmup = int(sched_cfg.get("warmup_steps") or 0)
    if sched_cfg.get("warmup_fraction"):
        warmup = int(float(sched_cfg.warmup_fraction) * total_steps)
    min_ratio = float(sched_cfg.get("min_lr_ratio", 0.0))
    final_ratio = float(sched_cfg.get("final_ratio", 1e-3))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, kind, min_ratio, final_ratio)
    )
