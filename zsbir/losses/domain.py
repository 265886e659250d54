"""Domain-adversarial loss (DANN, Ganin & Lempitsky 2015): gradient reversal + domain classifier.

The embedding goes through a Gradient Reversal Layer (identity forward, gradient x -lambda
backward) into a domain classifier MLP (`layers` x [Linear hidden, BatchNorm, ReLU] ->
Linear 1); binary cross-entropy with photo = 1, sketch = 0. The classifier learns to tell
the domains apart while the reversed gradient pushes the encoder towards embeddings it
cannot tell apart.

lambda schedules (`schedule`):
- `dann`: lambda_p = 2 / (1 + exp(-gamma p)) - 1 over training progress p in [0, 1] (gamma 10);
- `ramp`: linear from 0 to 1 at `grl_threshold_epoch` (epochs with their fraction), then 1
  (what the DANN baseline's official code meant; its bug leaves lambda at 0 until then);
- `constant`: always 1.
lambda is multiplied by `lambda_max`.

`reduction`: `view_sum` (the official baseline's: the sum over views of each view's mean
BCE, train.py:101-105, so the term is 3x the mean for sketch / positive / negative views)
or `mean` (one mean over every image).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zsbir.data.views import VIEWS
from zsbir.losses.base import LossConfigError, LossContext, LossTerm, check_views

SCHEDULES = ("dann", "ramp", "constant")
REDUCTIONS = ("view_sum", "mean")


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def reverse_gradient(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by -lam in the backward pass."""
    return _ReverseGradient.apply(x, float(lam))


def grl_lambda(schedule: str, progress: float, epochs_done: float, grl_threshold_epoch: float,
               gamma: float = 10.0) -> float:
    """The GRL coefficient (before `lambda_max`) at this point of training."""
    if schedule == "dann":
        return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0
    if schedule == "ramp":
        return min(1.0, epochs_done / grl_threshold_epoch)
    return 1.0


class DomainClassifier(nn.Sequential):
    """`layers` x [Linear hidden, BatchNorm, ReLU] -> Linear 1 (a logit: photo vs sketch)."""

    def __init__(self, in_dim: int, hidden: int = 1024, layers: int = 4):
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        blocks.append(nn.Linear(hidden if layers else in_dim, 1))
        super().__init__(*blocks)


class DomainAdversarialLoss(LossTerm):
    """BCE of the domain classifier on gradient-reversed embeddings (photo = 1, sketch = 0)."""

    def __init__(self, in_dim: int, hidden: int = 1024, layers: int = 4, schedule: str = "dann",
                 gamma: float = 10.0, grl_threshold_epoch: float = 25.0, lambda_max: float = 1.0,
                 feature: str = "embedding", views=("sketch", "photo_pos", "photo_neg"), reduction: str = "view_sum"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise LossConfigError(f"loss.domain_grl.reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        if schedule not in SCHEDULES:
            raise LossConfigError(f"loss.domain_grl.schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "ramp" and not grl_threshold_epoch > 0:
            raise LossConfigError(f"loss.domain_grl.grl_threshold_epoch must be > 0 for the ramp, got {grl_threshold_epoch}")
        self.views = check_views(views, tuple(VIEWS), "domain_grl")
        if len({VIEWS[v].domain for v in self.views}) < 2:
            raise LossConfigError(f"loss.domain_grl.views={list(self.views)} must include a sketch view and a photo view")
        self.schedule, self.gamma = schedule, float(gamma)
        self.grl_threshold_epoch, self.lambda_max = float(grl_threshold_epoch), float(lambda_max)
        self.feature = feature
        self.classifier = DomainClassifier(int(in_dim), int(hidden), int(layers))

    def current_lambda(self, ctx: LossContext) -> float:
        return self.lambda_max * grl_lambda(self.schedule, ctx.progress, ctx.epochs_done, self.grl_threshold_epoch,
                                            self.gamma)

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        present = [v for v in self.views if v in outputs]
        features = torch.cat([outputs[v].need(self.feature, "domain_grl") for v in present])
        is_photo = torch.cat([torch.full((len(outputs[v][self.feature]),), float(VIEWS[v].domain == "photo"),
                                         device=features.device) for v in present])
        logits = self.classifier(reverse_gradient(features, self.current_lambda(ctx))).squeeze(1)
        # sigmoid + BCE in one numerically stable op
        losses = F.binary_cross_entropy_with_logits(logits.float(), is_photo, reduction="none")
        if self.reduction == "mean":
            return losses.mean()
        sizes = [len(outputs[v][self.feature]) for v in present]
        return sum(part.mean() for part in losses.split(sizes))
