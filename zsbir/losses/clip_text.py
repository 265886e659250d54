"""Classification against CLIP text embeddings of the seen classes (Sketch_LVM, CVPR 2023).

    logits_c = logit_scale * cos(embedding, text_embedding(c))   for every seen class c
    L = cross-entropy(logits, y)   over the sketch and photo embeddings

The text embeddings come from the model's frozen text tower (`model.text_template`, by
default "a photo of a {}", filled with each seen class name; `_` and `-` become spaces),
computed once per run. logit_scale is CLIP's own temperature unless `logit_scale` is set.
The paper trains with this loss; its released code omits it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zsbir.data.views import VIEWS
from zsbir.losses.base import LossConfigError, LossContext, LossTerm, check_views, gather_labelled
from zsbir.models.encoder import UnsupportedModelOption


class CLIPTextLoss(LossTerm):
    def __init__(self, logit_scale: float | None = None, views=("sketch", "photo_pos", "photo_neg")):
        super().__init__()
        self.logit_scale = None if logit_scale is None else float(logit_scale)
        self.views = check_views(views, tuple(VIEWS), "clip_text")

    def text_embeddings(self, ctx: LossContext) -> torch.Tensor:
        try:
            return ctx.encoder.text_embeddings(ctx.class_names)
        except UnsupportedModelOption as err:
            raise LossConfigError(str(err)) from None

    def on_train_start(self, ctx: LossContext, class_names: list[str]) -> None:
        self.text_embeddings(ctx)  # fail before training when the model has no text tower

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        embeddings, labels = gather_labelled(batch, outputs, self.views, "embedding", "clip_text")
        text = self.text_embeddings(ctx).float()
        scale = self.logit_scale if self.logit_scale is not None else ctx.encoder.logit_scale.float()
        logits = scale * F.normalize(embeddings.float(), dim=1) @ text.T
        return F.cross_entropy(logits, labels)
