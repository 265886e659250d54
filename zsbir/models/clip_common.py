"""What the open_clip users share: building a CLIP, and its frozen text tower's class embeddings.

Two parts of zsbir hold an open_clip CLIP: the prompt-learning encoder (clip_prompt.py,
Sketch_LVM) and PuXIM's VxL sampler (vxl.py). Both build it the same way (QuickGELU forced,
as OpenAI's weights were trained with it; `tiny` swaps in the small random config in
clip_configs/) and embed class names the same way (`_` and `-` read as spaces, filled into
a template, L2-normalised, computed once per list), so that code lives here once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zsbir.models.weights import check_tiny_pretrained, open_clip_checkpoint

TINY_ARCH = "zsbir-tiny-clip"  # clip_configs/ next to this file: width 64, 2 layers, patch 8


def register_tiny_config() -> None:
    """Make open_clip know TINY_ARCH (idempotent)."""
    import open_clip

    if TINY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(Path(__file__).parent / "clip_configs" / f"{TINY_ARCH}.json")


def create_clip(arch: str, pretrained: str | None, image_size: int, tiny: bool = False,
                pretrained_key: str = "model.pretrained", error: type = ValueError, **kwargs: Any):
    """(open_clip CLIP, its tokenizer) with QuickGELU at `image_size`; `tiny`: TINY_ARCH, random.

    `pretrained_key` and `error` name the config key and the exception of a tiny model given
    a published weights tag (zsbir.models.weights.check_tiny_pretrained).
    """
    import open_clip

    if tiny:
        check_tiny_pretrained(pretrained, pretrained_key, error)
        register_tiny_config()
        arch = TINY_ARCH
    model = open_clip.create_model(arch, pretrained=open_clip_checkpoint(arch, pretrained), force_quick_gelu=True,
                                   force_image_size=image_size, **kwargs)
    return model, open_clip.get_tokenizer(arch)


def class_texts(template: str, class_names: list[str]) -> list[str]:
    """`template` filled with each class name, `_` and `-` read as spaces ("hot-air_balloon": "hot air balloon")."""
    return [template.format(name.replace("_", " ").replace("-", " ")) for name in class_names]


class TextEmbeddings:
    """L2-normalised embeddings of strings by a frozen CLIP text tower, computed once per list.

    Results follow the CLIP's device and dtype (read from its `logit_scale`), so a module move
    (`.to(...)`) after the first call never leaves a stale copy behind.
    """

    def __init__(self, clip: torch.nn.Module, tokenizer):
        self.clip, self.tokenizer = clip, tokenizer
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        key = tuple(texts)
        reference = self.clip.logit_scale
        cached = self._cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = self.clip.encode_text(self.tokenizer(list(texts)).to(reference.device), normalize=True)
        self._cache[key] = cached = cached.to(device=reference.device, dtype=reference.dtype)
        return cached
