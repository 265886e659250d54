"""Seen-class classification (cross-entropy on the encoder's `cls_logits`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zsbir.data.views import VIEWS
from zsbir.losses.base import LossContext, LossTerm, check_views, gather_labelled


class ClassificationLoss(LossTerm):
    """Cross-entropy over the seen classes, averaged over every image of `views`.

    The sketch and the positive photo carry `label`, the negative photo `neg_label`.
    """

    def __init__(self, label_smoothing: float = 0.0, views=("sketch", "photo_pos", "photo_neg")):
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.views = check_views(views, tuple(VIEWS), "ce")

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        logits, labels = gather_labelled(batch, outputs, self.views, "cls_logits", "ce")
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
