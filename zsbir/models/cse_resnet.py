"""CSE-ResNet-50 (SAKE, ICCV 2019): SE-ResNet-50 whose every SE block sees the domain.

Built from timm's `legacy_seresnet50` (whose `legacy_seresnet50.in1k` weights are the
ImageNet SE-ResNet-50 SAKE starts from) by replacing each block's SE module with a
`ConditionalSE`:

    s = GAP(x) -> fc1 (C -> C/16) -> ReLU -> concat tag (B x 1; 0 sketch, 1 photo)
      -> fc2 (C/16 + 1 -> C) -> sigmoid;   out = x * s

fc1 and the first C/16 input columns of fc2 are the ImageNet SE weights; the tag column
starts at zero, so at initialisation the network equals SE-ResNet-50 for both domains.
The conditional modules keep the SE module's parameter names, so the backbone's state
dict has timm's keys (only fc2's weight is one column wider).

Heads on the 2048-d pooled feature: `embed` Linear(2048 -> d) gives the retrieval
embedding, `kd_head` Linear(d -> 1000) the ImageNet distillation logits and `cls_head`
Linear(d -> #seen classes) the classification logits. With `svd_init: true`, embed and
kd_head start from the SVD of the ImageNet classifier W = U S V^T (1000 x 2048):
embed.weight = S_d V_d^T, embed.bias = 0, kd_head.weight = U_d, kd_head.bias = the
classifier's bias, so kd_head(embed(x)) is the best rank-d approximation of the ImageNet
logits. (When d exceeds the rank, as in the tiny smoke model, only the first rank rows /
columns come from the SVD; the rest keep PyTorch's default initialisation.)
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from timm.models.senet import SENet, SEModule, SEResNetBottleneck

from zsbir.models.encoder import Encoder, EncoderOutput
from zsbir.models.weights import check_tiny_pretrained, create_timm_model, load_timm_file, local_weights_path

DOMAIN_TAGS = {"sketch": 0.0, "photo": 1.0}
IMAGENET_CLASSES = 1000


class ConditionalSE(nn.Module):
    """A squeeze-and-excitation module whose excitation also reads the domain tag."""

    def __init__(self, se: SEModule):
        super().__init__()
        hidden, channels = se.fc1.out_channels, se.fc1.in_channels
        self.fc1 = se.fc1
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden + 1, channels, kernel_size=1)
        self.sigmoid = nn.Sigmoid()
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.weight[:, :hidden] = se.fc2.weight
            self.fc2.bias.copy_(se.fc2.bias)
        # Set by CSEResNet for the duration of one forward pass: (B,) tags, 0 sketch / 1 photo.
        self.domain_tag: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.domain_tag is None:
            raise RuntimeError("ConditionalSE needs a domain tag: call it through CSEResNet(x, tag)")
        s = self.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))
        tag = self.domain_tag.to(s.dtype).reshape(-1, 1, 1, 1).expand(s.shape[0], 1, 1, 1)
        s = self.fc2(torch.cat([s, tag], dim=1))
        return x * self.sigmoid(s)


class CSEResNet(nn.Module):
    """A timm SENet with every SE module made domain-conditional; returns pooled features."""

    def __init__(self, senet: SENet):
        super().__init__()
        senet.reset_classifier(0)
        self.senet = senet
        self.num_features = senet.num_features
        for block in senet.modules():
            if isinstance(getattr(block, "se_module", None), SEModule):
                block.se_module = ConditionalSE(block.se_module)
        self.se_blocks = [m for m in senet.modules() if isinstance(m, ConditionalSE)]

    @contextmanager
    def _tagged(self, tag: torch.Tensor):
        for se in self.se_blocks:
            se.domain_tag = tag
        try:
            yield
        finally:
            for se in self.se_blocks:
                se.domain_tag = None

    def forward(self, images: torch.Tensor, tag: torch.Tensor | float) -> torch.Tensor:
        tag = torch.as_tensor(tag, device=images.device).reshape(-1)
        with self._tagged(tag):
            features = self.senet.forward_features(images)
        return self.senet.global_pool(features)


class _NarrowSENet(SENet):
    """SE-ResNet with bottleneck blocks, one block per stage and 1/`width_div` of the widths.

    The shrunk random-init variant for smoke tests (`tiny: true`): the same block and SE
    classes as SE-ResNet-50, a few hundred thousand parameters instead of 28 million.
    """

    def __init__(self, num_classes: int = 0, width_div: int = 8, layers=(1, 1, 1, 1)):
        self.width_div = width_div
        super().__init__(SEResNetBottleneck, layers=layers, groups=1, reduction=16, drop_rate=0.0,
                         inplanes=64 // width_div, num_classes=0)
        self.num_features = self.head_hidden_size = 512 // width_div * SEResNetBottleneck.expansion
        self.reset_classifier(num_classes)
        self.pretrained_cfg = {"classifier": "last_linear"}

    def _make_layer(self, block, planes, *args, **kwargs):
        return super()._make_layer(block, planes // self.width_div, *args, **kwargs)


def build_seresnet(arch: str = "legacy_seresnet50", pretrained: str | None = None,
                   tiny: bool = False, num_classes: int = 0) -> SENet:
    """A plain (unconditioned) SE-ResNet, or its tiny variant, with weights from `pretrained`."""
    if not tiny:
        return create_timm_model(arch, pretrained, num_classes=num_classes)
    check_tiny_pretrained(pretrained)
    model = _NarrowSENet(num_classes=num_classes)
    if pretrained is not None:
        load_timm_file(model, local_weights_path(pretrained))
    return model


class FrozenTeacher(nn.Module):
    """An ImageNet classifier that stays frozen and in eval mode (SAKE's distillation teacher)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        # a parent's .train() must not switch the teacher's BatchNorm to batch statistics
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def build_imagenet_teacher(pretrained: str | None = "legacy_seresnet50.in1k", tiny: bool = False,
                           arch: str = "legacy_seresnet50") -> FrozenTeacher:
    """The frozen ImageNet SE-ResNet-50 with its 1000-way classifier; returns 1000-d logits."""
    return FrozenTeacher(build_seresnet(arch, pretrained, tiny, num_classes=IMAGENET_CLASSES))


class CSEResNetEncoder(Encoder):
    def __init__(
        self,
        arch: str = "legacy_seresnet50",
        pretrained: str | None = "legacy_seresnet50.in1k",
        embed_dim: int = 512,
        num_classes: int = 0,
        svd_init: bool = True,
        norm: str = "imagenet",
        tiny: bool = False,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.norm = norm
        senet = build_seresnet(arch, pretrained, tiny, num_classes=IMAGENET_CLASSES if svd_init else 0)
        imagenet_fc = senet.last_linear if svd_init else None
        self.backbone = CSEResNet(senet)
        self.embed = nn.Linear(self.backbone.num_features, embed_dim)
        self.kd_head = nn.Linear(embed_dim, IMAGENET_CLASSES)
        self.cls_head = nn.Linear(embed_dim, num_classes) if num_classes else None
        if imagenet_fc is not None:
            self._svd_init(imagenet_fc)

    @torch.no_grad()
    def _svd_init(self, fc: nn.Linear) -> None:
        u, s, vh = torch.linalg.svd(fc.weight.float(), full_matrices=False)
        k = min(self.embed_dim, s.numel())
        self.embed.weight[:k] = s[:k, None] * vh[:k]
        self.embed.bias.zero_()
        self.kd_head.weight[:, :k] = u[:, :k]
        self.kd_head.bias.copy_(fc.bias)

    def encode(self, images: torch.Tensor, domain: str) -> EncoderOutput:
        return self._heads(self.backbone(images, DOMAIN_TAGS[domain]))

    def encode_mixed(self, images: torch.Tensor, domain_ids: torch.Tensor) -> EncoderOutput:
        # One forward over the mixed batch, each sample's SE blocks conditioned on its own tag
        # (SAKE train_cse_resnet_sketchy_ext.py:194-218): BatchNorm sees both domains together.
        return self._heads(self.backbone(images, domain_ids.float()))

    def _heads(self, pooled: torch.Tensor) -> EncoderOutput:
        embedding = self.embed(pooled)
        out = EncoderOutput(embedding=embedding, pooled=pooled, kd_logits=self.kd_head(embedding))
        if self.cls_head is not None:
            out["cls_logits"] = self.cls_head(embedding)
        return out
