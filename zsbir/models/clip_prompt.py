"""CLIP ViT with learnable sketch / photo prompt tokens (Sketch_LVM, CVPR 2023).

open_clip `ViT-B-32-quickgelu` with the OpenAI weights (QuickGELU is what OpenAI
trained with; the plain `ViT-B-32` config uses nn.GELU and silently differs). One image
tower serves both domains; the domain picks its own prompt tokens (n_prompts x width), or
with `shared_prompts` both domains use one common set (Sketch_LVM's fine-grained model),
appended after the CLS and patch tokens, after the positional embedding and before
`ln_pre` (shallow), or in addition replaced by fresh prompts at the input of every later
block (`prompt_depth: deep`, VPT-deep style).

Outputs: "embedding" (B x 512: ln_post(CLS) @ proj, not normalised) and "tokens"
(B x patches x width: the patch tokens after the transformer and ln_post, prompts
excluded). `text_embeddings(class_names)` gives the frozen text tower's L2-normalised
embeddings of `text_template` filled with each class name, computed once per class list;
`logit_scale` is CLIP's (frozen) temperature, exp'd.

Trainable set (`trainable`), nothing else has requires_grad:
- `prompts`: the prompt tokens;
- `prompts_ln`: the prompts and every LayerNorm of the image tower (the paper's setting);
- `full`: the prompts and the whole image tower.
The text tower and logit_scale are always frozen.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from zsbir.models.clip_common import TextEmbeddings, class_texts, create_clip
from zsbir.models.encoder import Encoder, EncoderOutput

TRAINABLE = ("prompts", "prompts_ln", "full")
PROMPT_DEPTHS = ("shallow", "deep")


class CLIPPromptEncoder(Encoder):
    def __init__(
        self,
        arch: str = "ViT-B-32-quickgelu",
        pretrained: str | None = "openai",
        embed_dim: int = 512,
        image_size: int = 224,
        n_prompts: int = 3,
        prompt_depth: str = "shallow",
        prompt_init_std: float = 1.0,
        shared_prompts: bool = False,
        trainable: str = "prompts_ln",
        prompt_lr: float | None = 1e-4,
        ln_lr: float | None = 1e-6,
        text_template: str = "a photo of a {}",
        norm: str = "clip",
        tiny: bool = False,
        num_classes: int = 0,  # unused: CLIP classifies through text_embeddings(class_names)
    ):
        super().__init__()
        if trainable not in TRAINABLE:
            raise ValueError(f"model.trainable must be one of {TRAINABLE}, got {trainable!r}")
        if prompt_depth not in PROMPT_DEPTHS:
            raise ValueError(f"model.prompt_depth must be one of {PROMPT_DEPTHS}, got {prompt_depth!r}")
        self.clip, self.tokenizer = create_clip(arch, pretrained, image_size, tiny,
                                                **({"embed_dim": embed_dim} if tiny else {}))
        visual = self.clip.visual
        if visual.attn_pool is not None or visual.final_ln_after_pool or visual.pool_type != "tok":
            raise ValueError(f"{arch}: only CLS-token ViT image towers are supported")
        if visual.output_dim != embed_dim:
            raise ValueError(f"model.embed_dim={embed_dim} but {arch} outputs {visual.output_dim}-d embeddings")
        self.embed_dim = embed_dim
        self.norm = norm
        self.trainable = trainable
        self.prompt_lr, self.ln_lr = prompt_lr, ln_lr
        self.text_template = text_template
        self.deep = prompt_depth == "deep"

        width = visual.conv1.out_channels
        depth = len(visual.transformer.resblocks) if self.deep else 1
        # One parameter per prompt set: with shared_prompts the photo domain uses the sketch's
        # (a single `sketch_prompts` tensor in the checkpoint, one entry in the optimizer).
        self.shared_prompts = bool(shared_prompts)
        self.sketch_prompts = nn.Parameter(torch.randn(depth, n_prompts, width) * prompt_init_std)
        self.photo_prompts = (None if self.shared_prompts
                              else nn.Parameter(torch.randn(depth, n_prompts, width) * prompt_init_std))

        self.clip.requires_grad_(False)
        if trainable == "full":
            visual.requires_grad_(True)
        elif trainable == "prompts_ln":
            for module in self.layer_norms():
                module.requires_grad_(True)
        self._text = TextEmbeddings(self.clip, self.tokenizer)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # encode() runs the residual blocks itself (prompts are inserted between them), so
        # open_clip's own flag would not reach them: checkpoint each block here.
        self.grad_checkpointing = enable

    def layer_norms(self) -> list[nn.LayerNorm]:
        return [m for m in self.clip.visual.modules() if isinstance(m, nn.LayerNorm)]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.detach().exp()

    def encode(self, images: torch.Tensor, domain: str) -> EncoderOutput:
        visual = self.clip.visual
        prompts = self.sketch_prompts if domain == "sketch" or self.shared_prompts else self.photo_prompts
        batch = images.shape[0]
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.reshape(batch, x.shape[1], -1).permute(0, 2, 1)  # B x patches x width
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)  # before the prompts, so that it never drops one
        n_image_tokens = x.shape[1]
        x = visual.ln_pre(torch.cat([x, prompts[0].to(x.dtype).expand(batch, -1, -1)], dim=1))
        batch_first = visual.transformer.batch_first
        for i, block in enumerate(visual.transformer.resblocks):
            if i > 0 and self.deep:
                x = torch.cat([x[:, :n_image_tokens], prompts[i].to(x.dtype).expand(batch, -1, -1)], dim=1)
            x = self._run_block(block, x) if batch_first else self._run_block(block, x.transpose(0, 1)).transpose(0, 1)
        x = visual.ln_post(x)
        embedding = x[:, 0] @ visual.proj
        return EncoderOutput(embedding=embedding, tokens=x[:, 1:n_image_tokens])

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        prompts = [p for p in (self.sketch_prompts, self.photo_prompts) if p is not None]
        ln_ids = {id(p) for m in self.layer_norms() for p in m.parameters()}
        layer_norm = [p for m in self.layer_norms() for p in m.parameters() if p.requires_grad]
        rest = [p for p in self.clip.visual.parameters() if p.requires_grad and id(p) not in ln_ids]
        groups = [
            {"params": prompts, "lr": lr if self.prompt_lr is None else self.prompt_lr, "name": "prompts"},
            {"params": layer_norm, "lr": lr if self.ln_lr is None else self.ln_lr, "name": "layernorm"},
            {"params": rest, "lr": lr, "name": "image_tower"},
        ]
        return [g for g in groups if g["params"]]

    def text_embeddings(self, class_names: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings (len(class_names) x embed_dim) of the frozen text tower."""
        return self._text(class_texts(self.text_template, class_names))
