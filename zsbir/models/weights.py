"""Pretrained weights: a timm/open_clip tag, a local file or folder, or none."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def create_timm_model(arch: str, pretrained: str | None = None, **kwargs) -> nn.Module:
    """A timm model with weights from `pretrained`.

    - None: random initialisation;
    - an existing local file: a state dict (loaded with weights_only=True);
    - anything else: a timm pretrained tag such as "resnet50.a1_in1k".
    """
    import timm

    if pretrained is None:
        return timm.create_model(arch, pretrained=False, **kwargs)
    path = Path(str(pretrained)).expanduser()
    if path.exists():
        model = timm.create_model(arch, pretrained=False, **kwargs)
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        return model
    name = str(pretrained) if "." in str(pretrained) or str(pretrained) == arch else f"{arch}.{pretrained}"
    return timm.create_model(name, pretrained=True, **kwargs)
