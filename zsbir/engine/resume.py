"""Resuming with a changed config: every value config.yaml records is the value the run uses.

Loading `last.pt` restores state that was built from config keys: the optimiser's
parameter groups (`optim.lr`, `optim.weight_decay`, betas, ...), the scheduler's base
learning rates, the random number streams (`seed`), the best validation value
(`trainer.select_metric`) and the before-training metrics (`eval.*` metric settings).
Optimiser settings are re-applied from the new config after loading (and logged, old ->
new); a change to the others cannot be applied to restored state and is refused.
"""
from __future__ import annotations

import logging

import torch

from zsbir.engine.checkpoint import CheckpointError

log = logging.getLogger("zsbir.train")

# dotted key -> what restoring the checkpoint keeps from the old value
UNCHANGEABLE_ON_RESUME = {
    "seed": "the random number streams and data order",
    "trainer.select_metric": "the best validation value best.pt was chosen by",
    "eval.protocol": "the before-training metrics",
    "eval.per_class": "the before-training metrics",
    "eval.map_at": "the before-training metrics",
    "eval.prec_at": "the before-training metrics",
}
_NOT_SETTINGS = ("params", "initial_lr")


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def refuse_unchangeable_keys(saved: dict, current: dict, path) -> None:
    """CheckpointError when a key whose effect lives in the restored state changed since `last.pt`."""
    if not saved:
        return
    changed = [f"{key}: checkpoint {_lookup(saved, key)!r} -> config {_lookup(current, key)!r} ({what})"
               for key, what in UNCHANGEABLE_ON_RESUME.items() if _lookup(saved, key) != _lookup(current, key)]
    if changed:
        raise CheckpointError(
            f"cannot resume {path} with {'; '.join(changed)}: the restored state would keep the old value while "
            "config.yaml records the new one. Resume with the checkpoint's values, or start a new run directory "
            "(hydra.run.dir=...)"
        )


def optimizer_settings(optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """The freshly built optimiser's group settings and the scheduler's base lrs (before loading a checkpoint)."""
    return {"groups": [{k: v for k, v in group.items() if k not in _NOT_SETTINGS} for group in optimizer.param_groups],
            "base_lrs": list(scheduler.base_lrs)}


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, scheduler, fresh: dict) -> list[str]:
    """Put the config's settings back over those `load_state_dict` restored; returns `group i key: old -> new`."""
    changes = []
    for index, (group, settings, base_lr) in enumerate(zip(optimizer.param_groups, fresh["groups"], fresh["base_lrs"])):
        old_base = scheduler.base_lrs[index]
        if old_base != base_lr:
            changes.append(f"group {index} lr: {old_base:g} -> {base_lr:g}")
            scheduler.base_lrs[index] = base_lr
            group["initial_lr"] = base_lr
        for key, value in settings.items():
            if key != "lr" and group.get(key) != value:
                changes.append(f"group {index} {key}: {group.get(key)!r} -> {value!r}")
                group[key] = value
    if changes:  # the current lr follows the schedule from the new base lrs
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return changes
