"""PuXIM's encoder: one ViT-B/16 shared by sketches and photos (docs/puxim.md).

Any timm VisionTransformer: `vit_base_patch16_224` with ImageNet weights
(`augreg_in21k_ft_in1k`, the default), or the CLIP ViT-B/16 image tower with OpenAI
weights (`arch: vit_base_patch16_clip_quickgelu_224`, `pretrained: openai`, `norm: clip`).
Weights resolve through `zsbir.models.weights` like every backbone: a timm tag (from the
cache, or downloaded when online, else MissingWeightsError at once), a local file, or null.

Outputs of `encoder(images, domain)`: "embedding" = the CLS token after the final
LayerNorm (timm's `forward_head(pre_logits=True)`; 768-d for ViT-B/16, or `embed_dim`
through a linear projection when configured) and "tokens" (B x patches x width, the patch
tokens after the final norm). Retrieval uses the embedding only.

`encode_masked(images, domain, keep_index)` is PuXIM's extension of the Encoder interface,
used by the PuXIM loss terms only (the trainer and evaluator never call it): the same
network on the kept patches only. The masked patches are dropped after the positional
embedding (MAE-style), so each kept token keeps its position; the output "tokens" are the
kept patch tokens (B x k x width), in `keep_index` order.
"""
from __future__ import annotations

import torch
from timm.models import checkpoint_seq
from torch import nn

from zsbir.models.encoder import Encoder, EncoderOutput
from zsbir.models.weights import check_tiny_pretrained, create_timm_model

# `tiny: true` (debug=smoke) builds the same timm ViT class shrunk: width 64, 2 blocks,
# patch 8, so that 32 px smoke images give a 4 x 4 grid (as the tiny VxL CLIP does).
TINY_ARCH = "vit_tiny_patch16_224"
TINY_KWARGS = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
TINY_WIDTH = TINY_KWARGS["embed_dim"]


class PuXIMEncoder(Encoder):
    def __init__(
        self,
        arch: str = "vit_base_patch16_224",
        pretrained: str | None = "augreg_in21k_ft_in1k",
        image_size: int = 224,
        embed_dim: int | None = None,
        norm: str = "half",
        tiny: bool = False,
        model_kwargs: dict | None = None,
        num_classes: int = 0,  # unused: PuXIM has no classifier head
    ):
        super().__init__()
        kwargs = dict(model_kwargs or {})
        if tiny:
            check_tiny_pretrained(pretrained)
            arch, kwargs = TINY_ARCH, dict(TINY_KWARGS)
        self.vit = create_timm_model(arch, pretrained, num_classes=0, img_size=image_size, **kwargs)
        if not hasattr(self.vit, "_pos_embed") or not hasattr(self.vit, "num_prefix_tokens"):
            raise ValueError(f"model.arch={arch!r} is not a timm VisionTransformer; PuXIM needs a ViT "
                             "(e.g. vit_base_patch16_224 or vit_base_patch16_clip_quickgelu_224)")
        self.width = int(self.vit.embed_dim)
        self.projection = nn.Linear(self.width, int(embed_dim)) if embed_dim else None
        self.embed_dim = int(embed_dim) if embed_dim else self.width
        self.norm = norm

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of patches for the configured input size."""
        return tuple(int(n) for n in self.vit.patch_embed.grid_size)

    def _features(self, images: torch.Tensor, keep_index: torch.Tensor | None) -> torch.Tensor:
        vit = self.vit
        x = vit._pos_embed(vit.patch_embed(images))  # B x (prefix + patches) x width
        if keep_index is not None:
            prefix = vit.num_prefix_tokens
            kept = x[:, prefix:].gather(1, keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :prefix], kept], dim=1)
        x = vit.norm_pre(vit.patch_drop(x))
        # timm applies its grad_checkpointing flag in forward_features, which this bypasses.
        blocks = checkpoint_seq(vit.blocks, x) if vit.grad_checkpointing and self.training and torch.is_grad_enabled() \
            else vit.blocks(x)
        return vit.norm(blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def _output(self, x: torch.Tensor) -> EncoderOutput:
        embedding = self.vit.forward_head(x, pre_logits=True)
        if self.projection is not None:
            embedding = self.projection(embedding)
        return EncoderOutput(embedding=embedding, tokens=x[:, self.vit.num_prefix_tokens:])

    def encode(self, images: torch.Tensor, domain: str) -> EncoderOutput:
        return self._output(self._features(images, None))

    def encode_mixed(self, images: torch.Tensor, domain_ids: torch.Tensor) -> EncoderOutput:
        return self.encode(images, "photo")  # one ViT for both domains, which it does not read

    def encode_masked(self, images: torch.Tensor, domain: str, keep_index: torch.Tensor) -> EncoderOutput:
        """Encode only the patches `keep_index` (B x k, patch indices in row-major grid order)."""
        n_patches = self.patch_grid[0] * self.patch_grid[1]
        if keep_index.dim() != 2 or keep_index.shape[0] != images.shape[0]:
            raise ValueError(f"keep_index must be (batch, kept) = ({images.shape[0]}, k), got {tuple(keep_index.shape)}")
        if keep_index.numel() and (int(keep_index.min()) < 0 or int(keep_index.max()) >= n_patches):
            raise ValueError(f"keep_index holds patch indices outside 0..{n_patches - 1} (grid {self.patch_grid})")
        out = self._output(self._features(images, keep_index.long()))
        out["keep_index"] = keep_index
        return out
