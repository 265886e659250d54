"""ZSE-SBIR's network (Lin et al., CVPR 2023; docs/methods.md section 6).

Three parts, all in this one module so that one checkpoint holds them:

1. **Self-attention encoder** (`encode`): a timm ViT-B/16 shared by sketches and photos,
   whose patch embedding is averaged with a learnable convolutional tokenizer (stride-2
   convolutions down to the patch grid, randomly initialised). Outputs: "embedding" = the
   CLS (retrieval) token after the final LayerNorm, "tokens" = the patch tokens, and
   "sequence" = CLS + patch tokens, what the cross-attention reads.
2. **Cross-attention** (`relate`): for a batch of sketch-photo PAIRS (row i of the sketch
   sequences with row i of the photo sequences), post-norm transformer layers in which each
   stream queries the other (separate weights per stream). With `cross_values: own` (the
   official code) the attention weights over the other image's tokens mix the stream's OWN
   value vectors; `other` is textbook cross-attention.
3. **Relation network** (`relate` / `relation_logits`): the cross-attended patch tokens of
   each image are down-sampled by a 2x2 stride-2 convolution (14x14 -> 7x7 anchors at 224 px),
   the anchors' cosine similarities between sketch and photo (49 x 49) go through an MLP
   (2401 -> 343 -> 49 -> 1). Its output is a logit; sigmoid(logit) is the pair's relation score.

Every operation is per pair (attention over tokens, never across the batch), so a pair's
score does not depend on the other pairs scored with it (tests/test_zse.py checks it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq
from torch import nn

from zsbir.models.encoder import Encoder, EncoderOutput
from zsbir.models.weights import check_tiny_pretrained, create_timm_model

# `tiny: true` (debug=smoke): the same timm ViT class shrunk (width 64, 2 blocks, patch 8),
# so that 32 px smoke images give a 4 x 4 patch grid and 2 x 2 relation anchors.
TINY_ARCH = "vit_tiny_patch16_224"
TINY_KWARGS = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
CROSS_VALUES = ("own", "other")


def conv_tokenizer(patch_size: int, width: int) -> nn.Sequential:
    """Stride-2 convolutions from the image to the patch grid (official model/rn.py:59-73 at patch 16)."""
    stages = int(math.log2(patch_size))
    if 2 ** stages != patch_size or stages < 2:
        raise ValueError(f"the conv tokenizer needs a power-of-two patch size >= 4, got {patch_size}")
    channels = [3] + [64 * 2 ** i for i in range(stages - 1)] + [width]
    layers: list[nn.Module] = []
    for i in range(stages):
        kernel = 7 if i == 0 else 3
        layers.append(nn.Conv2d(channels[i], channels[i + 1], kernel, 2, kernel // 2, bias=False))
        if i < stages - 1:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class CrossAttentionLayer(nn.Module):
    """One stream of a cross-attention layer: post-norm attention to the other image, then a ReLU FFN."""

    def __init__(self, width: int, heads: int, ff: int, dropout: float, values: str):
        super().__init__()
        self.values = values
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(width, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, width))
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        value = own if self.values == "own" else other
        attended, _ = self.attention(own, other, value, need_weights=False)
        x = self.norm1(own + self.dropout1(attended))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class RelationNetwork(nn.Module):
    """Relation logit of sketch-photo pairs from their cross-attended patch tokens."""

    def __init__(self, width: int, grid: int, dim: int, dropout: float):
        super().__init__()
        if grid % 2:
            raise ValueError(f"the relation network halves the patch grid; {grid} x {grid} patches is odd "
                             "(use an input size that gives an even grid, e.g. 224 px at patch 16)")
        self.grid, side = grid, grid // 2
        anchors = side * side
        self.down = nn.Conv2d(width, dim, 2, 2)
        self.mlp = nn.Sequential(
            nn.Linear(anchors * anchors, anchors * side), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(anchors * side, anchors), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(anchors, 1),
        )

    def anchors(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B x grid² x width) patch tokens -> (B x anchors x dim), unit length."""
        batch, n, width = tokens.shape
        # row-major patch order -> a real spatial map (the official .view() skips this transpose)
        grid = tokens.transpose(1, 2).reshape(batch, width, self.grid, self.grid)
        return F.normalize(self.down(grid).flatten(2).transpose(1, 2), dim=-1)

    def forward(self, sketch_tokens: torch.Tensor, photo_tokens: torch.Tensor) -> torch.Tensor:
        similarity = self.anchors(sketch_tokens) @ self.anchors(photo_tokens).transpose(1, 2)
        return self.mlp(similarity.flatten(1)).squeeze(1)


class ZSEEncoder(Encoder):
    def __init__(
        self,
        arch: str = "vit_base_patch16_224",
        pretrained: str | None = "sam_in1k",
        image_size: int = 224,
        norm: str = "half",
        dropout: float = 0.1,
        cross_layers: int = 1,
        cross_heads: int = 8,
        cross_ff: int = 1024,
        cross_dropout: float = 0.1,
        cross_values: str = "own",
        relation_dim: int = 512,
        relation_dropout: float = 0.1,
        tiny: bool = False,
        num_classes: int = 0,  # unused: ZSE-SBIR has no classifier
    ):
        super().__init__()
        if cross_values not in CROSS_VALUES:
            raise ValueError(f"model.cross_values must be one of {CROSS_VALUES}, got {cross_values!r}")
        kwargs = {}
        if tiny:
            check_tiny_pretrained(pretrained)
            arch, kwargs = TINY_ARCH, dict(TINY_KWARGS)
            relation_dim = min(relation_dim, TINY_KWARGS["embed_dim"])
        # official dropouts (model/sa.py:73-94, 167, 186-188): 0.1 after the embedding, the
        # attention output and the MLP layers; none on the attention probabilities
        self.vit = create_timm_model(arch, pretrained, num_classes=0, img_size=image_size, pos_drop_rate=dropout,
                                     proj_drop_rate=dropout, attn_drop_rate=0.0, **kwargs)
        vit = self.vit
        if not hasattr(vit, "_pos_embed") or getattr(vit, "num_prefix_tokens", None) != 1:
            raise ValueError(f"model.arch={arch!r}: ZSE-SBIR needs a timm VisionTransformer with one CLS token "
                             "(e.g. vit_base_patch16_224)")
        self.width = int(vit.embed_dim)
        self.embed_dim = self.width
        self.norm = norm
        self.tokenizer = conv_tokenizer(int(vit.patch_embed.patch_size[0]), self.width)
        grid = int(vit.patch_embed.grid_size[0])
        self.cross_sketch = nn.ModuleList(CrossAttentionLayer(self.width, cross_heads, cross_ff, cross_dropout,
                                                              cross_values) for _ in range(cross_layers))
        self.cross_photo = nn.ModuleList(CrossAttentionLayer(self.width, cross_heads, cross_ff, cross_dropout,
                                                             cross_values) for _ in range(cross_layers))
        self.relation = RelationNetwork(self.width, grid, relation_dim, relation_dropout)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def _sequence(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        patches = vit.patch_embed(images)  # B x N x width
        learned = self.tokenizer(images.to(patches.dtype)).flatten(2).transpose(1, 2)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed((patches + learned) / 2)))
        # timm applies its grad_checkpointing flag in forward_features, which this bypasses
        if vit.grad_checkpointing and self.training and torch.is_grad_enabled():
            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        return vit.norm(x)

    def encode(self, images: torch.Tensor, domain: str) -> EncoderOutput:
        sequence = self._sequence(images)
        return EncoderOutput(embedding=sequence[:, 0], tokens=sequence[:, 1:], sequence=sequence)

    def encode_mixed(self, images: torch.Tensor, domain_ids: torch.Tensor) -> EncoderOutput:
        return self.encode(images, "photo")  # one ViT for both domains, which it does not read

    def cross_attend(self, sketch_seq: torch.Tensor, photo_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attended sequences of sketch-photo pairs (row i with row i); both streams read the previous layer."""
        if sketch_seq.shape != photo_seq.shape:
            raise ValueError(f"sketch and photo sequences must pair up row by row; got {tuple(sketch_seq.shape)} "
                             f"and {tuple(photo_seq.shape)}")
        for sketch_layer, photo_layer in zip(self.cross_sketch, self.cross_photo):
            sketch_seq, photo_seq = sketch_layer(sketch_seq, photo_seq), photo_layer(photo_seq, sketch_seq)
        return sketch_seq, photo_seq

    def relate(self, sketch_seq: torch.Tensor, photo_seq: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training outputs of pairs: cross-attended CLS tokens of both and the relation logit."""
        sketch, photo = self.cross_attend(sketch_seq, photo_seq)
        return {"sketch_cls": sketch[:, 0], "photo_cls": photo[:, 0],
                "relation_logit": self.relation(sketch[:, 1:], photo[:, 1:])}

    def relation_logits(self, sketch_seq: torch.Tensor, photo_seq: torch.Tensor) -> torch.Tensor:
        """Relation logits (B,) of pairs; higher = more similar (eval.rerank ranks by them)."""
        return self.relate(sketch_seq, photo_seq)["relation_logit"]
