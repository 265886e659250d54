"""Skipping non-finite steps (`trainer.skip_nonfinite=true`) without leaving NaN behind.

A skipped step must leave no trace: its forward pass already updated the BatchNorm running
statistics (and any buffer a loss term keeps, such as a memory queue) from the bad batch,
so those buffers are saved before the forward and put back when the step is dropped.
Otherwise `last.pt`/`best.pt` would hold NaN statistics and every later step would be
skipped as well. `SkipBudget` stops a run whose recent steps are mostly skipped: it is no
longer training, only burning time.
"""
from __future__ import annotations

from collections import deque

from torch import nn

from zsbir.errors import ZsbirError


class TooManySkippedStepsError(ZsbirError):
    """More than the allowed share of recent steps had a non-finite loss or gradient."""


def snapshot_buffers(*modules: nn.Module) -> list[tuple]:
    """(buffer, copy) of every buffer of `modules`, to undo a forward pass's in-place updates."""
    return [(buffer, buffer.detach().clone()) for module in modules for buffer in module.buffers()]


def restore_buffers(snapshot: list[tuple]) -> None:
    for buffer, saved in snapshot:
        buffer.data.copy_(saved)


class SkipBudget:
    """The last `window` steps may hold at most `max_fraction * window` skipped ones."""

    def __init__(self, max_fraction: float, window: int):
        self.max_fraction, self.window = float(max_fraction), int(window)
        self.recent: deque[bool] = deque(maxlen=self.window)

    def record(self, skipped: bool, where: str) -> None:
        self.recent.append(skipped)
        skipped_recently = sum(self.recent)
        if skipped and skipped_recently > self.max_fraction * self.window:
            raise TooManySkippedStepsError(
                f"{skipped_recently} of the last {len(self.recent)} steps (up to {where}) had a non-finite loss or "
                f"gradient and were skipped, more than trainer.skip_nonfinite_max_fraction={self.max_fraction:g} of "
                f"trainer.skip_nonfinite_window={self.window}: the run is no longer training. Lower optim.lr or "
                "enable trainer.grad_clip, then resume from last.pt or start a new run directory"
            )
