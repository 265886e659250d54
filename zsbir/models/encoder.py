"""The one encoder interface that trainer, evaluator and losses meet at.

`encoder(images, domain)` returns an `EncoderOutput`: a dict with at least
`"embedding"` (B x d, the retrieval feature, not normalised) and whatever extras the
backbone has (`"pooled"` backbone features, `"cls_logits"` seen-class logits,
`"kd_logits"` 1000-way distillation logits, `"tokens"` patch tokens, ...). Losses ask
for the extras they need by name and fail with a clear message if the model lacks them.
`domain` is "sketch" or "photo" for a batch of one domain, or a (B,) tensor of domain ids
(0 sketch, 1 photo; DOMAIN_IDS) for a batch that mixes both: the trainer's joint encoding
(`model.encode: joint`), one forward over all views of a step as SAKE's and DSN's code do,
so BatchNorm sees both domains in the same batch statistics.
`domain_indices` turns either form into the tensor.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zsbir.errors import ZsbirError

DOMAINS = ("sketch", "photo")
DOMAIN_IDS = {"sketch": 0, "photo": 1}

# Normalisation constants by name; a model config picks one with `model.norm`.
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def domain_indices(domain: str | torch.Tensor, batch_size: int, device=None) -> torch.Tensor:
    """Each sample's domain as an index into DOMAINS (a long tensor of length `batch_size`)."""
    if isinstance(domain, str):
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        return torch.full((batch_size,), DOMAINS.index(domain), dtype=torch.long, device=device)
    if not torch.is_tensor(domain) or domain.dtype.is_floating_point or domain.shape != (batch_size,):
        raise ValueError(f"per-sample domains must be an integer tensor of shape ({batch_size},) with values "
                         f"indexing {DOMAINS}; got {domain!r}")
    if len(domain) and not bool(((domain >= 0) & (domain < len(DOMAINS))).all()):
        raise ValueError(f"per-sample domains must index {DOMAINS} (0..{len(DOMAINS) - 1}); got values "
                         f"{sorted(set(domain.tolist()))}")
    return domain.to(device=device, dtype=torch.long)


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

    def forward(self, images: torch.Tensor, domain: str | torch.Tensor) -> EncoderOutput:
        if torch.is_tensor(domain):
            if domain.shape != images.shape[:1]:
                raise ValueError(f"per-sample domain ids must have shape ({len(images)},), got {tuple(domain.shape)}")
            return self.encode_mixed(images, domain)
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        return self.encode(images, domain)

    def encode_mixed(self, images: torch.Tensor, domain_ids: torch.Tensor) -> EncoderOutput:
        """Encode a batch that mixes domains (per-sample ids, 0 sketch / 1 photo).

        This fallback encodes each domain's samples separately and puts the outputs back in
        batch order: exact for models without batch statistics (ViTs: LayerNorm only).
        Models whose layers depend on the batch (BatchNorm CNNs) override it with one forward.
        """
        parts = {name: torch.nonzero(domain_ids == i).squeeze(1) for name, i in DOMAIN_IDS.items()}
        parts = {name: rows for name, rows in parts.items() if len(rows)}
        if len(parts) == 1:
            return self.encode(images, next(iter(parts)))
        outs = {name: self.encode(images[rows], name) for name, rows in parts.items()}
        merged = EncoderOutput()
        for key, first in outs["sketch"].items():
            if torch.is_tensor(first) and first.shape[:1] == parts["sketch"].shape:
                value = first.new_empty((len(images), *first.shape[1:]))
                for name, rows in parts.items():
                    value[rows] = outs[name][key]
                merged[key] = value
            else:  # not per sample (e.g. a scalar): shared
                merged[key] = first
        return merged

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
    from zsbir.instantiate import build_from_config

    # `name` is the preset's label; `encode` is read by the trainer (joint | per_domain encoding of a step's views)
    encoder = build_from_config(model_cfg, drop=("name", "encode"), num_classes=num_seen_classes)
    if not isinstance(encoder, Encoder):
        raise TypeError(f"model config {model_cfg.get('_target_')} did not build a zsbir Encoder")
    return encoder
