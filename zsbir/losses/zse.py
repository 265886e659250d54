"""ZSE-SBIR's two loss terms (official utils/loss.py, train.py:47-57), read from the pair pass.

Both read the outputs of `RelationPairsPass` (zsbir/models/auxiliary.py), which runs the
model's cross-attention and relation network on the step's pairs (sketch, positive photo)
and (sketch, negative photo); the two terms share that one pass.

- `PairTripletLoss`: triplet margin loss on the cross-attended CLS tokens: anchor = the
  sketch's CLS from its positive pair, positive = the positive photo's CLS, negative = the
  negative photo's CLS (from its pair with the sketch).
- `RelationLoss`: MSE between sigmoid(relation logit) and 0.99 (positive pair) / 0.01
  (negative pair), the official clamped targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zsbir.losses.base import LossConfigError, LossContext, LossTerm
from zsbir.losses.triplet import DISTANCES, paired_distance
from zsbir.models.auxiliary import RelationPairsPass


def _check_model(ctx: LossContext, loss_name: str) -> None:
    if not callable(getattr(ctx.encoder, "relate", None)):
        raise LossConfigError(f"loss.{loss_name} needs a model with ZSE-SBIR's cross-attention and relation network "
                              f"(model=zse_sbir); {type(ctx.encoder).__name__} has none")


class PairTripletLoss(LossTerm):
    """mean(max(0, d(s⁺, p⁺) - d(s⁺, p⁻) + margin)) on the cross-attended CLS tokens."""

    def __init__(self, margin: float = 1.0, distance: str = "euclidean"):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"loss.zse_triplet.distance must be one of {DISTANCES}, got {distance!r}")
        if margin < 0:
            raise ValueError(f"loss.zse_triplet.margin must be >= 0, got {margin}")
        self.margin, self.distance = float(margin), distance
        self.auxiliary_passes = (RelationPairsPass(),)

    def on_train_start(self, ctx: LossContext, class_names: list[str]) -> None:
        _check_model(ctx, "zse_triplet")

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        anchor = outputs["photo_pos"]["pair_sketch_cls"]
        d_pos = paired_distance(anchor, outputs["photo_pos"]["pair_photo_cls"], self.distance)
        d_neg = paired_distance(anchor, outputs["photo_neg"]["pair_photo_cls"], self.distance)
        return F.relu(d_pos - d_neg + self.margin).mean()


class RelationLoss(LossTerm):
    """MSE of the relation score sigmoid(logit) against `positive` / `negative` targets."""

    def __init__(self, positive: float = 0.99, negative: float = 0.01):
        super().__init__()
        if not 0 <= negative < positive <= 1:
            raise ValueError(f"loss.zse_relation needs 0 <= negative < positive <= 1, got {negative} and {positive}")
        self.positive, self.negative = float(positive), float(negative)
        self.auxiliary_passes = (RelationPairsPass(),)

    def on_train_start(self, ctx: LossContext, class_names: list[str]) -> None:
        _check_model(ctx, "zse_relation")

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        positive = torch.sigmoid(outputs["photo_pos"]["relation_logit"])
        negative = torch.sigmoid(outputs["photo_neg"]["relation_logit"])
        scores = torch.cat([positive, negative])
        targets = torch.cat([torch.full_like(positive, self.positive), torch.full_like(negative, self.negative)])
        return F.mse_loss(scores, targets)
