"""MA-ZS-SBIR's loss terms (Lyou et al., WACV 2024), for model=ma_clip (zsbir/models/modality_aware.py).

Every image (sketch or photo, drawn independently: data.sampler=streams) is paired with the
text of its class ("a photo of a {class}."). With i / t the L2-normalised CLIP image / text
embeddings of a pair, E_m the modality embedding of modality m (m_i: the image's, 0 photo
or 1 sketch; 3 text) and cos the cosine similarity:
- `ma_contrastive`: CLIP's symmetric cross-entropy between images and texts at CLIP's
  (trainable) temperature. `positives: class` (default) counts every text of the image's
  class as its positive; `positives: pair` is the official B x B matrix in which another
  image of the same class is a negative of its own class text (a defect, docs/methods.md).
- `ma_center` (semantic centre): s = (i + t) / 2, normalised; the semantics of each side,
  i - E_{m_i} and t - E_3, are pulled to s: mean(1 - cos(i - E_{m_i}, s)) + mean(1 - cos(t - E_3, s)).
- `ma_reconstruct`: the text's semantics converted to the image's modality gives the image
  back and vice versa: mean(1 - cos(t - E_3 + E_{m_i}, i)) + mean(1 - cos(i - E_{m_i} + E_3, t)).
- `ma_discriminator`: a linear classifier (owned by the term, trained at the optimiser's lr)
  tells the modality of every conversion normalise(semantics + E_k) of a sample to each
  modality k other than its own; cross-entropy averaged over those, (text + image) / 2.
The official total is the weighted MEAN (sum of w * L over the sum of the active weights,
1 + 0.1 + 0.1 + 0.02); the preset's weights are those ratios pre-divided.
The class texts of a step are embedded once (with gradients: the text tower trains) by the
ClassTextPass, which adds `outputs[view]["text"]` (each item's class text embedding).
"""
from __future__ import annotations

from typing import Hashable

import torch
import torch.nn.functional as F
from torch import nn

from zsbir.data.views import VIEWS
from zsbir.losses.base import LossConfigError, LossContext, LossTerm, check_views
from zsbir.models.auxiliary import AuxiliaryPass
from zsbir.models.modality_aware import MODALITY_IDS

STREAM_IMAGE_VIEWS = ("sketch", "photo")
POSITIVES = ("class", "pair")


class ClassTextPass(AuxiliaryPass):
    """`outputs[view]["text"]`: the normalised text embedding of each item's class, computed once per step."""

    def __init__(self, views: tuple[str, ...]):
        self.views = tuple(views)
        self.class_names: list[str] = []

    @property
    def key(self) -> Hashable:
        return ("class_text", self.views)

    def prepare(self, encoder, class_names: list[str]) -> None:
        if not hasattr(encoder, "class_text_embeddings") or not hasattr(encoder, "mode_vectors"):
            raise LossConfigError(f"MA-ZS-SBIR's losses need model=ma_clip (a CLIP with modality embeddings); "
                                  f"{type(encoder).__name__} has none")
        self.class_names = list(class_names)

    def __call__(self, batch: dict, outputs: dict, encoder) -> None:
        views = [v for v in self.views if v in outputs]
        labels = torch.cat([batch[VIEWS[v].label_key] for v in views])
        present, index = torch.unique(labels, return_inverse=True)  # embed each class of the step once
        text = encoder.class_text_embeddings([self.class_names[c] for c in present.tolist()])[index]
        for view, part in zip(views, text.split([len(batch[VIEWS[v].label_key]) for v in views])):
            outputs[view]["text"] = part


class ModalityAwareTerm(LossTerm):
    """Shared plumbing: the step's (image, text, image-modality id, label) rows."""

    name = "ma"

    def __init__(self, views=STREAM_IMAGE_VIEWS):
        super().__init__()
        self.views = check_views(views, tuple(VIEWS), self.name)
        self.auxiliary_passes = (ClassTextPass(self.views),)

    def rows(self, batch: dict, outputs: dict):
        views = [v for v in self.views if v in outputs]
        image = torch.cat([outputs[v].need("embedding", self.name) for v in views])
        text = torch.cat([outputs[v].need("text", self.name) for v in views])
        modality = torch.cat([torch.full((len(outputs[v]["embedding"]),), MODALITY_IDS[VIEWS[v].domain],
                                         dtype=torch.long, device=image.device) for v in views])
        labels = torch.cat([batch[VIEWS[v].label_key] for v in views])
        return F.normalize(image, dim=-1), text, modality, labels


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


class MAContrastiveLoss(ModalityAwareTerm):
    name = "ma_contrastive"

    def __init__(self, positives: str = "class", views=STREAM_IMAGE_VIEWS):
        super().__init__(views)
        if positives not in POSITIVES:
            raise LossConfigError(f"loss.ma_contrastive.positives must be one of {POSITIVES}, got {positives!r}")
        self.positives = positives

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        image, text, _, labels = self.rows(batch, outputs)
        scale = ctx.encoder.logit_scale.float()
        if self.positives == "pair":  # the official B x B matrix: only the item's own text row is positive
            logits = scale * image @ text.T
            target = torch.arange(len(image), device=image.device)
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        classes, target = torch.unique(labels, return_inverse=True)
        # one text row per class (the rows of a class are the same embedding)
        row = torch.empty(len(classes), dtype=torch.long, device=labels.device).scatter_(
            0, target, torch.arange(len(labels), device=labels.device))
        logits = scale * image @ text[row].T  # images x the step's distinct class texts
        image_to_text = F.cross_entropy(logits, target)
        # text -> image: every image of the class is a positive (mean log-likelihood over them)
        log_prob = logits.T.log_softmax(dim=1)  # classes x images
        positive = target.unsqueeze(0) == torch.arange(len(classes), device=labels.device).unsqueeze(1)
        text_to_image = -((log_prob * positive).sum(1) / positive.sum(1)).mean()
        return (image_to_text + text_to_image) / 2


class MACenterLoss(ModalityAwareTerm):
    name = "ma_center"

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        image, text, modality, _ = self.rows(batch, outputs)
        centre = F.normalize((image + text) / 2, dim=-1)
        image_semantics = image - ctx.encoder.mode_vectors(modality)
        text_semantics = text - ctx.encoder.mode_vectors("text")
        return _cosine_distance(text_semantics, centre) + _cosine_distance(image_semantics, centre)


class MAReconstructLoss(ModalityAwareTerm):
    name = "ma_reconstruct"

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        image, text, modality, _ = self.rows(batch, outputs)
        image_mode, text_mode = ctx.encoder.mode_vectors(modality), ctx.encoder.mode_vectors("text")
        return (_cosine_distance(text - text_mode + image_mode, image)
                + _cosine_distance(image - image_mode + text_mode, text))


class MADiscriminatorLoss(ModalityAwareTerm):
    name = "ma_discriminator"

    def __init__(self, embed_dim: int = 512, n_modes: int = 4, views=STREAM_IMAGE_VIEWS):
        super().__init__(views)
        self.classifier = nn.Linear(embed_dim, n_modes)

    def _conversions_loss(self, semantics: torch.Tensor, own: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
        converted = F.normalize(semantics.unsqueeze(1) + modes.unsqueeze(0), dim=-1)  # N x modes x d
        target = torch.arange(len(modes), device=own.device).expand(len(own), -1)
        target = target.masked_fill(target == own.unsqueeze(1), -1)  # a sample's own modality is not asked
        return F.cross_entropy(self.classifier(converted).flatten(0, 1), target.flatten(), ignore_index=-1)

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        image, text, modality, _ = self.rows(batch, outputs)
        modes = ctx.encoder.mode_embedding
        if modes.shape != (self.classifier.out_features, self.classifier.in_features):
            raise LossConfigError(f"loss.ma_discriminator is built for {self.classifier.out_features} modalities of "
                                  f"{self.classifier.in_features} dims but the model has {tuple(modes.shape)}: set "
                                  "loss.ma_discriminator.n_modes / embed_dim to model.n_modes / embed_dim")
        text_own = torch.full_like(modality, MODALITY_IDS["text"])
        return (self._conversions_loss(text - ctx.encoder.mode_vectors("text"), text_own, modes)
                + self._conversions_loss(image - ctx.encoder.mode_vectors(modality), modality, modes)) / 2
