"""ImageNet CNN encoders (any timm architecture) with an embedding head.

One tower shared by both domains, or one tower per domain (`towers: separate`, both
starting from the same weights), a linear embedding head and an optional seen-class
classifier head. `model=resnet50` is this class with `arch: resnet50` and
`pretrained: resnet50.tv_in1k` (torchvision's original ImageNet weights, the ones the
SBIR papers' code loaded through torchvision).

`dsbn: per_domain | shared` turns every BatchNorm of the backbone into domain-specific
BatchNorm (zsbir/models/dsbn.py): sketches and photos keep their own statistics (and, with
`per_domain`, their own affine weights) in training and evaluation alike. `dsbn: null` keeps
plain BatchNorm shared by both domains.

Outputs: "embedding" (B x embed_dim), "pooled" (B x backbone features, 2048 for
ResNet-50) and, with `cls_head: true`, "cls_logits" (B x #seen classes).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from zsbir.models.dsbn import DomainBatchNorm2d, DomainRouter, convert_to_dsbn
from zsbir.models.encoder import DOMAINS, Encoder, EncoderOutput, UnsupportedModelOption, domain_indices
from zsbir.models.weights import check_tiny_pretrained, create_timm_model

# `tiny: true` (set by debug=smoke) swaps any architecture for this one: a few thousand
# parameters, random weights, so that smoke runs finish in seconds on a CPU.
TINY_ARCH = "resnet10t"
TINY_KWARGS = {"channels": (8, 16, 32, 64), "stem_width": 8}


def check_dsbn_convertible(backbone: nn.Module, arch: str) -> None:
    """Every BatchNorm of the backbone must have become domain-specific (none left shared)."""
    converted = [m for m in backbone.modules() if isinstance(m, DomainBatchNorm2d)]
    inner = {id(norm) for layer in converted for norm in layer.norms}
    left = sorted({type(m).__name__ for m in backbone.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in inner})
    if left:
        raise ValueError(f"model.dsbn cannot convert the {', '.join(left)} layers of {arch!r} (only plain BatchNorm2d); "
                         "set model.dsbn=null or choose a ResNet-style arch")
    if not converted:
        raise ValueError(f"model.dsbn: {arch!r} has no BatchNorm2d layer to make domain-specific; set model.dsbn=null")


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
        dsbn: str | None = None,
    ):
        super().__init__()
        if towers not in ("shared", "separate"):
            raise ValueError(f"model.towers must be 'shared' or 'separate', got {towers!r}")
        kwargs = dict(model_kwargs or {})
        if tiny:
            check_tiny_pretrained(pretrained)
            arch, kwargs = TINY_ARCH, dict(TINY_KWARGS)
        backbone = create_timm_model(arch, pretrained, num_classes=0, **kwargs)
        self.router = DomainRouter() if dsbn else None
        if dsbn:
            if towers == "separate":
                raise ValueError("model.dsbn needs model.towers=shared (separate towers already keep one BatchNorm "
                                 "per domain); set model.dsbn=null or model.towers=shared")
            check_dsbn_convertible(convert_to_dsbn(backbone, self.router, dsbn), arch)
        self.towers = towers
        self.photo_backbone = backbone
        self.sketch_backbone = copy.deepcopy(backbone) if towers == "separate" else None
        self.embed_dim = embed_dim
        self.norm = norm
        self.embed = nn.Linear(backbone.num_features, embed_dim)
        self.cls_head = nn.Linear(embed_dim, num_classes) if cls_head and num_classes else None

    def backbone_for(self, domain: str | torch.Tensor) -> nn.Module:
        if self.sketch_backbone is None:
            return self.photo_backbone
        if not isinstance(domain, str):  # a per-sample tensor: fine as long as the batch has one domain
            present = domain.unique().tolist()
            if len(present) > 1:
                raise ValueError("model.towers=separate encodes one domain per call; a mixed sketch/photo batch "
                                 "needs model.towers=shared (with model.dsbn for per-domain normalisation)")
            domain = DOMAINS[present[0]] if present else "photo"
        return self.sketch_backbone if domain == "sketch" else self.photo_backbone

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable and self.router is not None:  # the recomputation in backward would run without its domains
            raise UnsupportedModelOption("trainer.grad_checkpointing does not work with model.dsbn (domain-specific "
                                         "BatchNorm); set one of them to false / null")
        for backbone in filter(None, (self.photo_backbone, self.sketch_backbone)):
            backbone.set_grad_checkpointing(enable)  # timm: checkpoints each stage

    def encode(self, images: torch.Tensor, domain: str) -> EncoderOutput:
        return self._heads(self._pooled(images, domain))

    def encode_mixed(self, images: torch.Tensor, domain_ids: torch.Tensor) -> EncoderOutput:
        if self.sketch_backbone is not None:  # one tower per domain: each tower sees its own samples
            return super().encode_mixed(images, domain_ids)
        # One shared tower, one forward: joint BatchNorm, or with model.dsbn each sample's own domain statistics.
        return self._heads(self._pooled(images, domain_ids))

    def _pooled(self, images: torch.Tensor, domain: str | torch.Tensor) -> torch.Tensor:
        if self.router is None:
            return self.backbone_for(domain)(images)
        with self.router.route(domain_indices(domain, len(images), images.device)):
            return self.photo_backbone(images)

    def _heads(self, pooled: torch.Tensor) -> EncoderOutput:
        embedding = self.embed(pooled)
        out = EncoderOutput(embedding=embedding, pooled=pooled)
        if self.cls_head is not None:
            out["cls_logits"] = self.cls_head(embedding)
        return out
