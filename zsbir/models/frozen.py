"""Frozen pretrained image encoders: the no-training baselines (`experiment=frozen`).

One image tower embeds sketches and photos alike; nothing is trained (every parameter has
requires_grad=False), so a run with `trainer.max_steps=0` measures what the foundation
model brings before any ZS-SBIR training. The embedding is the model's own image embedding:
- open_clip (CLIP, SigLIP): `encode_image`, the projected image feature CLIP / SigLIP
  compare with text (CLS token through `proj` for CLIP; the attention-pooled, projected
  feature for SigLIP). The text tower is dropped after loading: retrieval needs none.
- timm (DINOv2): the CLS token after the final LayerNorm (`num_classes=0`, token pooling),
  the image-level feature DINOv2's self-distillation objective trains and that its paper's
  k-NN retrieval evaluations read.

Weights: `model.pretrained` is a library tag or a local file (zsbir/models/weights.py), as
for every backbone; offline, a tag that is not cached fails at once with the command that
writes a file. Normalisation is the model's own (`norm`, checked against the library's
pretrained config when a tag is given). `tiny=true` (debug=smoke) builds a shrunk random
tower of the same library for CPU tests.
"""
from __future__ import annotations

import torch
from torch import nn

from zsbir.models.clip_common import create_clip
from zsbir.models.encoder import NORMALIZATION, Encoder, EncoderOutput
from zsbir.models.weights import check_tiny_pretrained, create_timm_model, local_weights_path

LIBRARIES = ("open_clip", "timm")
# debug=smoke: a tiny DINOv2-style ViT (same class and token pooling; 2 blocks of width 64, patch 8 for 32 px inputs)
TINY_TIMM = {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8}


def norm_of(mean, std) -> str | None:
    """The NORMALIZATION key with these mean / std (None when no key matches)."""
    for name, (ref_mean, ref_std) in NORMALIZATION.items():
        if torch.allclose(torch.tensor(mean, dtype=torch.float64), torch.tensor(ref_mean, dtype=torch.float64),
                          atol=1e-4) and torch.allclose(torch.tensor(std, dtype=torch.float64),
                                                        torch.tensor(ref_std, dtype=torch.float64), atol=1e-4):
            return name
    return None


def library_norm(library: str, arch: str, tag: str | None) -> str | None:
    """The normalisation the library's pretrained config gives weights `tag` of `arch` (None if unknown)."""
    if tag is None or local_weights_path(tag) is not None:
        return None
    if library == "open_clip":
        import open_clip

        cfg = open_clip.get_pretrained_cfg(arch, tag)
        return norm_of(cfg["mean"], cfg["std"]) if cfg and "mean" in cfg else None
    import timm

    name = tag if tag.split(".")[0] == arch.split(".")[0] else f"{arch.split('.')[0]}.{tag}"
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    return norm_of(cfg.mean, cfg.std) if cfg is not None else None


class FrozenEncoder(Encoder):
    def __init__(
        self,
        library: str = "open_clip",
        arch: str = "ViT-B-32-quickgelu",
        pretrained: str | None = "openai",
        norm: str = "clip",
        image_size: int = 224,
        tiny: bool = False,
        num_classes: int = 0,  # unused: nothing is classified
    ):
        super().__init__()
        if library not in LIBRARIES:
            raise ValueError(f"model.library must be one of {LIBRARIES}, got {library!r}")
        if norm not in NORMALIZATION:
            raise ValueError(f"model.norm must be one of {tuple(NORMALIZATION)}, got {norm!r}")
        expected = library_norm(library, arch, pretrained)
        if expected is not None and expected != norm:
            raise ValueError(f"model.norm={norm} but {library} normalises {arch} / {pretrained} as {expected!r}: "
                             f"set model.norm={expected}")
        if tiny:
            check_tiny_pretrained(pretrained)
        self.library, self.arch, self.norm = library, arch, norm
        self.tower = self._open_clip_tower(arch, pretrained, image_size, tiny) if library == "open_clip" \
            else self._timm_tower(arch, pretrained, image_size, tiny)
        self.tower.requires_grad_(False)
        self.tower.eval()
        with torch.no_grad():
            self.embed_dim = int(self.tower(torch.zeros(1, 3, image_size, image_size)).shape[-1])

    @staticmethod
    def _open_clip_tower(arch: str, pretrained: str | None, image_size: int, tiny: bool) -> nn.Module:
        # QuickGELU is forced as for every CLIP here; SigLIP's image tower is a timm model it does not touch
        model, _ = create_clip(arch, pretrained, image_size, tiny)
        return model.visual  # encode_image(x) == visual(x): the projected, not normalised, image embedding

    @staticmethod
    def _timm_tower(arch: str, pretrained: str | None, image_size: int, tiny: bool) -> nn.Module:
        # dynamic_img_size: the positional embedding is interpolated to the input's patch grid (DINOv2's
        # weights are stored at 518 px; model.image_size picks the resolution).
        kwargs = {"num_classes": 0, "dynamic_img_size": True, **(TINY_TIMM | {"img_size": image_size} if tiny else {})}
        return create_timm_model(arch, pretrained, **kwargs)

    def train(self, mode: bool = True):
        # frozen: dropout / stochastic depth stay off whatever the caller asks
        return super().train(False)

    def encode(self, images: torch.Tensor, domain: str) -> EncoderOutput:
        return EncoderOutput(embedding=self.tower(images))
