"""CLIP with learned modality embeddings: MA-ZS-SBIR (Lyou et al., WACV 2024).

The whole CLIP (image tower, text tower and temperature) is fine-tuned at a tiny learning
rate (`clip_lr`, 5e-8 in the official config) while a table of modality embeddings (one
d-vector per modality: 0 photo, 1 sketch, 2 unused, 3 text, the official indices) trains
at the optimiser's lr. A sample's semantics is its L2-normalised CLIP embedding minus its
modality's vector; adding another modality's vector "converts" it (docs/methods.md,
"MA-ZS-SBIR"). The loss terms are in zsbir/losses/modality_aware.py.

Outputs: "embedding" (B x d): the L2-normalised CLIP image embedding, what the official
evaluation ranks by ("original" logits). `retrieval: converted` instead gives sketch queries
converted to the photo modality (normalise(e - E_sketch + E_photo)) at evaluation, the
official code's second evaluation ("converted" logits); photos are never converted.
`class_text_embeddings(names)` runs the text tower WITH gradients (it is trained);
`logit_scale` is CLIP's trainable log-temperature, re-initialised to `logit_scale_init`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zsbir.models.clip_common import create_clip
from zsbir.models.encoder import Encoder, EncoderOutput

# The official modality indices (the m1 / m2 columns of its annotation CSVs).
MODALITY_IDS = {"photo": 0, "sketch": 1, "text": 3}
RETRIEVAL = ("image", "converted")


class ModalityAwareCLIP(Encoder):
    def __init__(
        self,
        arch: str = "ViT-B-32-quickgelu",
        pretrained: str | None = "openai",
        embed_dim: int = 512,
        image_size: int = 224,
        n_modes: int = 4,
        mode_init_std: float = 1.0,
        clip_lr: float | None = 5e-8,
        logit_scale_init: float = 2.6592,
        text_template: str = "a photo of a {}.",
        retrieval: str = "image",
        norm: str = "clip",
        tiny: bool = False,
        num_classes: int = 0,  # unused: classes enter through their text
    ):
        super().__init__()
        if retrieval not in RETRIEVAL:
            raise ValueError(f"model.retrieval must be one of {RETRIEVAL}, got {retrieval!r}")
        if n_modes <= max(MODALITY_IDS.values()):
            raise ValueError(f"model.n_modes={n_modes}: must exceed the text modality's index {MODALITY_IDS['text']}")
        self.clip, self.tokenizer = create_clip(arch, pretrained, image_size, tiny,
                                                **({"embed_dim": embed_dim} if tiny else {}))
        if self.clip.visual.output_dim != embed_dim:
            raise ValueError(f"model.embed_dim={embed_dim} but {arch} outputs {self.clip.visual.output_dim}-d embeddings")
        with torch.no_grad():  # the official code replaces CLIP's temperature (log 100) by this value
            self.clip.logit_scale.fill_(float(logit_scale_init))
        self.mode_embedding = nn.Parameter(torch.randn(n_modes, embed_dim) * mode_init_std)  # nn.Embedding's N(0, 1)
        self.embed_dim, self.norm, self.clip_lr = embed_dim, norm, clip_lr
        self.text_template, self.retrieval = text_template, retrieval
        self._tokens: dict[tuple, torch.Tensor] = {}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()  # trainable (at clip_lr)

    def mode_vectors(self, modality: str | torch.Tensor) -> torch.Tensor:
        """The modality embedding(s) of a modality name or a tensor of modality ids."""
        ids = modality if torch.is_tensor(modality) else torch.tensor(MODALITY_IDS[modality])
        return self.mode_embedding[ids.to(self.mode_embedding.device)]

    def encode(self, images: torch.Tensor, domain: str) -> EncoderOutput:
        embedding = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        if self.retrieval == "converted" and domain == "sketch" and not self.training:
            embedding = F.normalize(embedding - self.mode_vectors("sketch") + self.mode_vectors("photo"), dim=-1)
        return EncoderOutput(embedding=embedding)

    def class_text_embeddings(self, class_names: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings of `text_template` per class, with gradients (the text tower trains)."""
        key = (tuple(class_names), self.text_template)
        if key not in self._tokens:
            names = [name.replace("_", " ").replace("-", " ") for name in class_names]
            self._tokens[key] = self.tokenizer([self.text_template.format(name) for name in names])
        tokens = self._tokens[key].to(self.clip.logit_scale.device)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    def text_embeddings(self, class_names: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.class_text_embeddings(class_names)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        clip = [p for p in self.clip.parameters() if p.requires_grad]
        return [{"params": clip, "lr": lr if self.clip_lr is None else self.clip_lr, "name": "clip"},
                {"params": [self.mode_embedding], "lr": lr, "name": "mode_embedding"}]
