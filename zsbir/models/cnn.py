"""ImageNet CNN encoders (any timm architecture) with an embedding head.

One tower shared by both domains, or one tower per domain (`towers: separate`, both
starting from the same weights), a linear embedding head and an optional seen-class
classifier head. `model=resnet50` is this class with `arch: resnet50` and
`pretrained: resnet50.tv_in1k` (torchvision's original ImageNet weights, the ones the
SBIR papers' code loaded through torchvision).

Outputs: "embedding" (B x embed_dim), "pooled" (B x backbone features, 2048 for
ResNet-50) and, with `cls_head: true`, "cls_logits" (B x #seen classes).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from zsbir.models.encoder import Encoder, EncoderOutput
from zsbir.models.weights import check_tiny_pretrained, create_timm_model

# `tiny: true` (set by debug=smoke) swaps any architecture for this one: a few thousand
# parameters, random weights, so that smoke runs finish in seconds on a CPU.
TINY_ARCH = "resnet10t"
TINY_KWARGS = {"channels": (8, 16, 32, 64), "stem_width": 8}


class CNNEncoder(Encoder):
    def __init__(
        self,
        arch: str = "resnet50",
        embed_dim: int = 512,
        towers: str = "shared",
        pretrained: str | None = None,
        num_classes: int = 0,
        cls_head: bool = False,
        norm: str = "imagenet",
        tiny: bool = False,
        model_kwargs: dict | None = None,
    ):
        super().__init__()
        if towers not in ("shared", "separate"):
            raise ValueError(f"model.towers must be 'shared' or 'separate', got {towers!r}")
        kwargs = dict(model_kwargs or {})
        if tiny:
            check_tiny_pretrained(pretrained)
            arch, kwargs = TINY_ARCH, dict(TINY_KWARGS)
        backbone = create_timm_model(arch, pretrained, num_classes=0, **kwargs)
        self.towers = towers
        self.photo_backbone = backbone
        self.sketch_backbone = copy.deepcopy(backbone) if towers == "separate" else None
        self.embed_dim = embed_dim
        self.norm = norm
        self.embed = nn.Linear(backbone.num_features, embed_dim)
        self.cls_head = nn.Linear(embed_dim, num_classes) if cls_head and num_classes else None

    def backbone_for(self, domain: str) -> nn.Module:
        if domain == "sketch" and self.sketch_backbone is not None:
            return self.sketch_backbone
        return self.photo_backbone

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for backbone in filter(None, (self.photo_backbone, self.sketch_backbone)):
            backbone.set_grad_checkpointing(enable)  # timm: checkpoints each stage

    def encode(self, images: torch.Tensor, domain: str) -> EncoderOutput:
        pooled = self.backbone_for(domain)(images)
        embedding = self.embed(pooled)
        out = EncoderOutput(embedding=embedding, pooled=pooled)
        if self.cls_head is not None:
            out["cls_logits"] = self.cls_head(embedding)
        return out
