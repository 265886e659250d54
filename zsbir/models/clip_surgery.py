"""CLIP Surgery on open_clip's ViT: patch-text maps that follow the object, not the background.

Li et al., "CLIP Surgery for Better Explainability with Enhancement in Open-Vocabulary
Tasks" (2023); PuXIM's VxL sampler loads it as `CS-ViT-B/16` (docs/puxim.md cites the
official lines). Two changes to a frozen CLIP, no new weights:

1. Architecture surgery (`surgery_tokens`). In the last `depth` blocks (6 for ViT-B/16)
   a second, "v-v" path runs beside the unchanged one. Each of those blocks computes, from
   the ORIGINAL path's normalised input `ln_1(x)`, both its ordinary attention
   `softmax(q k^T / sqrt(d)) v` and a value-value attention `softmax(v v^T / sqrt(d)) v`
   (same heads, same in/out projections). The original path goes on as usual (attention,
   then MLP); the v-v path starts from the input of the first surgery block and only adds
   each block's v-v attention output (no MLP). The CLS token is taken from the original
   path, the patch tokens from the v-v path; all tokens then go through ln_post and proj.
2. Feature surgery (`feature_surgery`). For an image's L2-normalised tokens f_t and a set
   of K L2-normalised texts e_k, with weights w = softmax(2 * f_cls . e) / mean(...):

       s[t, k] = sum_c ( f_tc w_k e_kc  -  mean_k'( f_tc w_k' e_k'c ) )

   i.e. the part of each token-text product that all texts share (the "redundant"
   feature, mostly background) is removed before summing. PuXIM uses K = 2 texts per
   photo, a neutral "a" and the photo's class, and reads the class column.

Both run under no-grad on a frozen model; the weights are those of the plain CLIP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The official CS-ViT-B/16 applies the surgery to the last 6 of its 12 blocks.
SURGERY_DEPTH = 6


def _embed(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """open_clip's ViT stem: patch embedding, CLS token, positions, ln_pre -> B x (1 + patches) x width."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


def attention_paths(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v-v attention, ordinary q-k attention) of one block for the same input x (B x N x width).

    Both use the block's own input and output projections and heads; only the attention
    weights differ: softmax(v v^T / sqrt(d)) instead of softmax(q k^T / sqrt(d)).
    """
    batch, tokens, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)

    def merged(out: torch.Tensor) -> torch.Tensor:
        return attn.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))

    return merged(F.scaled_dot_product_attention(v, v, v)), merged(F.scaled_dot_product_attention(q, k, v))


@torch.no_grad()
def surgery_tokens(visual: nn.Module, images: torch.Tensor, depth: int = SURGERY_DEPTH) -> torch.Tensor:
    """All tokens (B x (1 + patches) x embed) of an open_clip ViT with the surgery in its last `depth` blocks.

    Token 0 is the CLS from the original path (equal to the plain CLIP image embedding
    before normalisation), the others the v-v path's patch tokens; both after ln_post and
    proj. depth=0 gives the plain CLIP tokens; a depth beyond the model's blocks means all of them.
    """
    blocks = list(visual.transformer.resblocks)
    depth = max(0, min(int(depth), len(blocks)))
    # open_clip's older Transformer runs sequence-first; its blocks then expect N x B x width
    sequence_first = not getattr(visual.transformer, "batch_first", True)
    x = _embed(visual, images)
    for block in blocks[:len(blocks) - depth]:
        x = block(x.transpose(0, 1)).transpose(0, 1) if sequence_first else block(x)
    original, surgery = x, x
    for block in blocks[len(blocks) - depth:]:
        value_value, ordinary = attention_paths(block.attn, block.ln_1(original))
        surgery = surgery + block.ls_1(value_value)  # no MLP on the v-v path
        original = original + block.ls_1(ordinary)
        original = original + block.ls_2(block.mlp(block.ln_2(original)))
    tokens = torch.cat([original[:, :1], surgery[:, 1:]], dim=1)
    return visual.ln_post(tokens) @ visual.proj


def feature_surgery(image_tokens: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Token-text similarities with the redundant (shared by all texts) part removed: B x T x K.

    `image_tokens` (B x T x D, CLS first) and `texts` (B x K x D, one text set per image)
    are L2-normalised. Equal to summing the per-channel products after subtracting their
    mean over texts; the sum is taken first here (linear), so no B x T x K x D tensor.
    """
    prob = torch.softmax(2.0 * torch.einsum("bd,bkd->bk", image_tokens[:, 0], texts), dim=-1)
    weighted = (prob / prob.mean(dim=-1, keepdim=True)).unsqueeze(-1) * texts
    return torch.einsum("btd,bkd->btk", image_tokens, weighted - weighted.mean(dim=1, keepdim=True))
