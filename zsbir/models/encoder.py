"""The one encoder interface that trainer, evaluator and losses meet at.

`encoder(images, domain)` returns an `EncoderOutput`: a dict with at least
`"embedding"` (B x d, the retrieval feature, not normalised) and whatever extras the
backbone has (`"pooled"` backbone features, `"cls_logits"` seen-class logits,
`"kd_logits"` 1000-way distillation logits, `"tokens"` patch tokens, ...). Losses ask
for the extras they need by name and fail with a clear message if the model lacks them.
`domain` is "sketch" or "photo".
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zsbir.errors import ZsbirError

DOMAINS = ("sketch", "photo")

# Normalisation constants by name; a model config picks one with `model.norm`.
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def renormalize(images: torch.Tensor, from_norm: str, to_norm: str) -> torch.Tensor:
    """Images normalised with `from_norm` re-expressed in `to_norm` (keys of NORMALIZATION)."""
    if from_norm == to_norm:
        return images
    (mean_a, std_a), (mean_b, std_b) = NORMALIZATION[from_norm], NORMALIZATION[to_norm]

    def column(values):
        return torch.tensor(values, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)

    return (images * column(std_a) + column(mean_a) - column(mean_b)) / column(std_b)


class EncoderOutput(dict):
    """Outputs of one encoder call; `out["embedding"]` always exists."""

    def need(self, key: str, loss_name: str) -> torch.Tensor:
        if key not in self:
            raise KeyError(
                f"loss '{loss_name}' needs the encoder output '{key}', but this model only "
                f"provides {sorted(self)}; choose a model that has it (see docs/methods.md)"
            )
        return self[key]


class UnsupportedModelOption(ZsbirError):
    """A trainer option the chosen model cannot provide (e.g. gradient checkpointing)."""


class Encoder(nn.Module):
    """Base class of every backbone.

    Subclasses implement `encode(images, domain) -> EncoderOutput` and set
    `embed_dim` and `norm` (a key of NORMALIZATION). They may override `param_groups`
    (per-part learning rates) and `text_embeddings` (models with a text tower).
    """

    embed_dim: int
    norm: str = "imagenet"

    def encode(self, images: torch.Tensor, domain: str) -> EncoderOutput:  # pragma: no cover
        raise NotImplementedError

    def forward(self, images: torch.Tensor, domain: str) -> EncoderOutput:
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        return self.encode(images, domain)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; frozen parameters are never included."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "name": "encoder"}] if params else []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of storing them (less memory, more compute)."""
        raise UnsupportedModelOption(
            f"{type(self).__name__} does not support gradient checkpointing; set trainer.grad_checkpointing=false "
            "(ViT models support it: model=clip_prompt; timm CNNs: model=resnet50 / small_cnn)"
        )

    def text_embeddings(self, class_names: list[str]) -> torch.Tensor:
        raise UnsupportedModelOption(
            f"{type(self).__name__} has no text tower; losses that need class-name text "
            "embeddings (clip_text) require model=clip_prompt"
        )

    def num_parameters(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total, trainable


def build_encoder(model_cfg, num_seen_classes: int) -> Encoder:
    """Instantiate `model_cfg` (a Hydra `_target_` node) for a dataset with this many seen classes."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from zsbir.models.weights import MissingWeightsError

    cfg = OmegaConf.to_container(model_cfg, resolve=True)
    cfg.pop("name", None)  # the preset's label, not a constructor argument
    try:
        encoder = instantiate(cfg, num_classes=num_seen_classes, _convert_="all")
    except InstantiationException as error:
        # our own messages (missing weights, bad model.* values) say all there is to say
        if isinstance(error.__cause__, (MissingWeightsError, ValueError, FileNotFoundError)):
            raise error.__cause__ from None
        raise
    if not isinstance(encoder, Encoder):
        raise TypeError(f"model config {model_cfg.get('_target_')} did not build a zsbir Encoder")
    return encoder
