"""CLIP Surgery (zsbir/models/clip_surgery.py): hand-computed small cases and the tiny open_clip ViT."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zsbir.models.clip_surgery import attention_paths, feature_surgery, surgery_tokens
from zsbir.models.vxl import VxLConfigError, VxLSampler, shared_sampler


def tiny_visual():
    return shared_sampler("ViT-B-16", None, 32, 0.7, "{}", True).model.visual


# ------------------------------------------------------------------ feature surgery


def test_feature_surgery_hand_computed():
    """CLS = e_a = [1, 0], patch = e_y = [0, 1]: every entry follows from w = 2 softmax(2 [1, 0])."""
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # CLS, one patch
    texts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # "a", the class
    p_a, p_y = math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)
    # weighted texts [2 p_a, 0] and [0, 2 p_y]; their mean [p_a, p_y] is the redundant part
    expected = torch.tensor([[[p_a, -p_a],      # CLS . ([p_a, -p_y], [-p_a, p_y])
                              [-p_y, p_y]]])    # patch . (same)
    assert torch.allclose(feature_surgery(tokens, texts), expected, atol=1e-6)


def test_feature_surgery_equals_the_per_channel_formula():
    """The einsum form equals the literal one: per-channel products, minus their mean over texts, summed."""
    generator = torch.Generator().manual_seed(0)
    tokens = nn.functional.normalize(torch.randn(3, 5, 8, generator=generator), dim=-1)
    texts = nn.functional.normalize(torch.randn(3, 4, 8, generator=generator), dim=-1)
    prob = (2 * tokens[:, :1] @ texts.transpose(1, 2)).softmax(-1)  # B x 1 x K
    weights = prob / prob.mean(-1, keepdim=True)
    products = tokens.unsqueeze(2) * texts.unsqueeze(1) * weights.unsqueeze(-1)  # B x T x K x D
    literal = (products - products.mean(2, keepdim=True)).sum(-1)
    assert torch.allclose(feature_surgery(tokens, texts), literal, atol=1e-6)


# ------------------------------------------------------------------ v-v attention


def test_attention_paths_hand_computed():
    """One head, width 2, q = k = 0 and v = x: ordinary attention is uniform, v-v attention is softmax(x x^T / sqrt 2)."""
    attn = nn.MultiheadAttention(2, 1, batch_first=True)
    with torch.no_grad():
        attn.in_proj_weight.zero_()
        attn.in_proj_weight[4:] = torch.eye(2)  # rows 0-1: q, 2-3: k, 4-5: v
        attn.in_proj_bias.zero_()
        attn.out_proj.weight.copy_(torch.eye(2))
        attn.out_proj.bias.zero_()
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    value_value, ordinary = attention_paths(attn, x)
    near = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)  # 0.6698
    assert torch.allclose(value_value, torch.tensor([[[near, 1 - near], [1 - near, near]]]), atol=1e-6)
    assert torch.allclose(ordinary, torch.full((1, 2, 2), 0.5), atol=1e-6)
    # the ordinary path is exactly what nn.MultiheadAttention computes
    reference, _ = attn(x, x, x, need_weights=False)
    assert torch.allclose(ordinary, reference, atol=1e-6)


# ------------------------------------------------------------------ architecture surgery on open_clip


def _reference_surgery(visual, images, depth):
    """The dual-path forward written out: the original path through open_clip's own blocks, the v-v path
    summing each surgery block's v-v attention of ln_1(original input), head by head."""
    x = visual.ln_pre(torch.cat([visual.class_embedding.expand(len(images), 1, -1),
                                 visual.conv1(images).flatten(2).transpose(1, 2)], 1) + visual.positional_embedding)
    blocks = list(visual.transformer.resblocks)
    for block in blocks[:-depth]:
        x = block(x)
    surgery = x.clone()
    for block in blocks[-depth:]:
        attn = block.attn
        q, k, v = nn.functional.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        d = v.shape[-1] // attn.num_heads
        heads = []
        for h in range(attn.num_heads):
            vh = v[..., h * d:(h + 1) * d]
            heads.append(torch.softmax(vh @ vh.transpose(1, 2) / math.sqrt(d), -1) @ vh)
        surgery = surgery + attn.out_proj(torch.cat(heads, -1))
        x = block(x)
    tokens = torch.cat([x[:, :1], surgery[:, 1:]], 1)
    return visual.ln_post(tokens) @ visual.proj


@torch.no_grad()
@pytest.mark.parametrize("depth", [1, 2])
def test_surgery_tokens_match_the_written_out_dual_path(depth):
    visual = tiny_visual()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = surgery_tokens(visual, images, depth)
    assert ours.shape == (2, 17, 32)
    assert torch.allclose(ours, _reference_surgery(visual, images, depth), atol=1e-5)


@torch.no_grad()
def test_surgery_keeps_the_cls_and_changes_the_patches():
    visual = tiny_visual()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    pooled, tokens = visual(images)  # the plain CLIP: image embedding and ln_post'd patch tokens
    plain = surgery_tokens(visual, images, depth=0)
    assert torch.allclose(plain[:, 0], pooled, atol=1e-5) and torch.allclose(plain[:, 1:], tokens @ visual.proj, atol=1e-5)
    surgery = surgery_tokens(visual, images, depth=2)
    assert torch.allclose(surgery[:, 0], pooled, atol=1e-5)  # the CLS comes from the unchanged path
    assert not torch.allclose(surgery[:, 1:], plain[:, 1:], atol=1e-3)
    # the v-v path skips the MLP: zeroing the last block's MLP moves the CLS, not the patches
    last = visual.transformer.resblocks[-1].mlp.c_proj
    saved = last.weight.clone(), last.bias.clone()
    try:
        last.weight.zero_(), last.bias.zero_()
        no_mlp = surgery_tokens(visual, images, depth=2)
    finally:
        last.weight.copy_(saved[0]), last.bias.copy_(saved[1])
    assert torch.allclose(no_mlp[:, 1:], surgery[:, 1:], atol=1e-6)
    assert not torch.allclose(no_mlp[:, 0], surgery[:, 0], atol=1e-4)


# ------------------------------------------------------------------ the VxL sampler's scoring


@torch.no_grad()
def test_vxl_surgery_relevance_is_the_class_column_against_a_neutral_text():
    sampler = shared_sampler("ViT-B-16", None, 32, 0.7, "{}", True)
    assert sampler.scoring == "surgery" and sampler.surgery_blocks == 6 and sampler.redundant_text == "a"
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    names = ["alarm_clock", "pig", "hot-air_balloon"]
    labels = torch.tensor([2, 0, 1])
    text = sampler.text_embeddings(names)[labels]
    assert torch.equal(sampler.text_embeddings(names), sampler.encode_texts(["alarm clock", "pig", "hot air balloon"]))
    tokens = nn.functional.normalize(surgery_tokens(sampler.model.visual, images, 6), dim=-1)
    neutral = sampler.encode_texts(["a"]).expand(3, -1)
    expected = feature_surgery(tokens, torch.stack([neutral, text], 1))[:, 1:, 1]
    relevance = sampler.relevance(images, text)
    assert relevance.shape == (3, 16) and torch.allclose(relevance, expected, atol=1e-6)
    kept = sampler.keep_index(images, labels, names)
    assert torch.equal(kept, relevance.topk(sampler.n_keep, dim=1).indices.sort(dim=1).values)
    plain = VxLSampler(pretrained=None, image_size=32, tiny=True, scoring="plain")
    plain.model.load_state_dict(sampler.model.state_dict())
    assert not torch.allclose(plain.relevance(images, text), relevance, atol=1e-3)


def test_vxl_rejects_unknown_scoring_and_no_surgery_blocks():
    with pytest.raises(VxLConfigError, match="vxl.scoring must be one of"):
        VxLSampler(pretrained=None, image_size=32, tiny=True, scoring="gradcam")
    with pytest.raises(VxLConfigError, match="vxl.surgery_blocks must be at least 1"):
        VxLSampler(pretrained=None, image_size=32, tiny=True, surgery_blocks=0)


def test_puxim_preset_scores_with_clip_surgery(compose_cfg):
    cfg = compose_cfg("experiment=puxim")
    for term in ("puxim_recon", "puxim_match"):
        vxl = cfg.loss[term].vxl
        assert (vxl.scoring, vxl.surgery_blocks, vxl.redundant_text, vxl.text_template) == ("surgery", 6, "a", "{}")


def test_vxl_surgery_rejects_blocks_without_packed_qkv(monkeypatch):
    import open_clip

    real = open_clip.create_model

    def without_packed_qkv(*args, **kwargs):
        model = real(*args, **kwargs)
        model.visual.transformer.resblocks[-1].attn = nn.Identity()  # as a custom attention block would look
        return model

    monkeypatch.setattr(open_clip, "create_model", without_packed_qkv)
    with pytest.raises(VxLConfigError, match="packed q/k/v projection .* vxl.scoring=plain"):
        VxLSampler(pretrained=None, image_size=32, tiny=True)
