"""Seen-class classification (cross-entropy on the encoder's `cls_logits`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zsbir.losses.base import LossContext, LossTerm


class ClassificationLoss(LossTerm):
    """Cross-entropy over the seen classes, averaged over every encoded view with a label.

    The sketch and the positive photo carry `label`, the negative photo `neg_label`.
    """

    views = ("sketch", "photo_pos", "photo_neg")

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        logits, labels = [], []
        for view, key in (("sketch", "label"), ("photo_pos", "label"), ("photo_neg", "neg_label")):
            if view in outputs:
                logits.append(outputs[view].need("cls_logits", "ce"))
                labels.append(batch[key])
        return F.cross_entropy(torch.cat(logits), torch.cat(labels), label_smoothing=self.label_smoothing)
