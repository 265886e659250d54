"""Supervised contrastive loss across modalities and two augmented views (SupCon, Khosla et
al. 2020; DSN's cross-modal contrastive term).

Every image of `views` (default: the sketch and the positive photo, each in two
independently augmented views) is an anchor; its positives are all other images of the
same class, whatever their modality or view, and the contrast set is every other image:

    L = mean over anchors i of  -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )

with z the L2-normalised features, optionally after a projection head (DSN's paper
describes a 128-d head; its official code has none and uses the embedding directly).
Under distributed training the contrast set spans every rank's features, gathered with
their gradient; each rank's anchors are its own images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsbir.engine import distributed as dist
from zsbir.data.views import VIEWS
from zsbir.losses.base import LossConfigError, LossContext, LossTerm, check_views, gather_labelled


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float,
                anchors: slice | None = None) -> torch.Tensor:
    """SupCon over L2-normalised `features` (N x d); `anchors` selects the anchor rows (default all)."""
    anchors = anchors or slice(0, len(features))
    index = torch.arange(len(features), device=features.device)
    logits = features[anchors] @ features.T / temperature
    not_self = index[anchors][:, None] != index[None, :]
    positive = (labels[anchors][:, None] == labels[None, :]) & not_self
    logits = logits.masked_fill(~not_self, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_positive = positive.sum(dim=1)
    has_positive = n_positive > 0
    if not has_positive.any():
        return features.sum() * 0.0
    mean_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=1)[has_positive] / n_positive[has_positive]
    return -mean_log_prob.mean()


class SupConLoss(LossTerm):
    def __init__(self, temperature: float = 0.07, feature: str = "embedding", projection_dim: int | None = None,
                 in_dim: int | None = None, views=("sketch", "sketch_v2", "photo_pos", "photo_pos_v2")):
        super().__init__()
        if not temperature > 0:
            raise LossConfigError(f"loss.contrastive.temperature must be > 0, got {temperature}")
        self.temperature, self.feature = float(temperature), feature
        self.views = check_views(views, tuple(VIEWS), "contrastive")
        self.projection = None
        if projection_dim:
            if not in_dim:
                raise LossConfigError("loss.contrastive.projection_dim needs loss.contrastive.in_dim (the feature size)")
            # SupCon's head: Linear -> ReLU -> Linear
            self.projection = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True),
                                            nn.Linear(in_dim, int(projection_dim)))

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        features, labels = gather_labelled(batch, outputs, self.views, self.feature, "contrastive")
        if self.projection is not None:
            features = self.projection(features)
        features = F.normalize(features.float(), dim=1)
        local = len(features)
        features, labels = dist.all_gather_with_grad(features), dist.all_gather_with_grad(labels)
        mine = slice(dist.rank() * local, (dist.rank() + 1) * local)
        return supcon_loss(features, labels, self.temperature, mine)
