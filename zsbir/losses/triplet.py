"""Triplet loss: anchor sketch, positive photo (same class), negative photo (other class)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zsbir.losses.base import LossContext, LossTerm

DISTANCES = ("euclidean", "cosine")
MINING = ("none", "hard", "semihard")


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance matrix (len(a) x len(b))."""
    if distance == "cosine":
        return 1 - F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    # The exact pairwise form: cdist's default matrix-product shortcut loses precision to
    # cancellation once a batch has more than 25 rows, and these distances enter the loss.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def paired_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=-1)
    # Same as torch's TripletMarginLoss(p=2): eps inside the norm keeps the gradient finite.
    return F.pairwise_distance(a, b, p=2, eps=1e-6)


class TripletLoss(LossTerm):
    """mean(max(0, d(sketch, photo_pos) - d(sketch, photo_neg) + margin)).

    `mining="none"` uses the batch's sampled negative photo. `hard` / `semihard` instead
    mine, for every sketch, among all photos of the batch (positives and negatives) with
    a different label: the closest one (hard), or the closest one that is still farther
    than the positive (semi-hard; the hardest one if none is).
    """

    def __init__(self, margin: float = 0.2, distance: str = "cosine", mining: str = "none"):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"loss.triplet.distance must be one of {DISTANCES}, got {distance!r}")
        if mining not in MINING:
            raise ValueError(f"loss.triplet.mining must be one of {MINING}, got {mining!r}")
        if margin < 0:
            raise ValueError(f"loss.triplet.margin must be >= 0, got {margin}")
        self.margin, self.distance, self.mining = float(margin), distance, mining

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        anchor = outputs["sketch"]["embedding"]
        positive = outputs["photo_pos"]["embedding"]
        d_pos = paired_distance(anchor, positive, self.distance)
        if self.mining == "none":
            d_neg = paired_distance(anchor, outputs["photo_neg"]["embedding"], self.distance)
        else:
            d_neg = self._mined_negative_distance(batch, anchor, positive, outputs["photo_neg"]["embedding"], d_pos)
        return F.relu(d_pos - d_neg + self.margin).mean()

    def _mined_negative_distance(self, batch, anchor, positive, negative, d_pos):
        photos = torch.cat([positive, negative])
        photo_labels = torch.cat([batch["label"], batch["neg_label"]])
        dist = pairwise_distance(anchor, photos, self.distance)
        valid = batch["label"][:, None] != photo_labels[None, :]  # never a photo of the anchor's class
        inf = torch.finfo(dist.dtype).max
        hardest = dist.masked_fill(~valid, inf).min(dim=1).values
        if self.mining == "hard":
            return hardest
        farther = valid & (dist > d_pos[:, None].detach())
        semihard = dist.masked_fill(~farther, inf).min(dim=1).values
        return torch.where(farther.any(dim=1), semihard, hardest)
