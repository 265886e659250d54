"""PuXIM's VxL sampler: which photo patches are relevant to the photo's class.

A frozen CLIP ViT-B/16 (open_clip `ViT-B-16` with QuickGELU and the OpenAI weights)
scores every patch of a photo against the text of its class. `scoring: surgery` (the
default, as PuXIM's official code, which loads CLIP Surgery's `CS-ViT-B/16`) uses CLIP
Surgery (zsbir/models/clip_surgery.py): the v-v attention path in the last 6 blocks gives
the patch tokens, and feature surgery removes what the class text shares with a neutral
text ("a"):

    relevance(p) = feature_surgery(tokens, [text("a"), text(y)])[p, y]

with tokens L2-normalised after ln_post and proj. `scoring: plain` is the plain CLIP
patch-text cosine (last-layer tokens, ln_post and proj, no surgery):

    relevance(p) = cos( ln_post(z_p) @ W_proj , t_y )

Class texts are `text_template` filled with the class name (`_` and `-` read as spaces).
The `round((1 - mask_ratio) * patches)` most relevant patches are kept (at least one; ties
go to the lower patch index), the rest are masked. Everything runs under no-grad; the
CLIP model is never trained and never saved in checkpoints.

Kept-patch indices can be cached per training photo in a dict the caller owns (the PuXIM
loss terms keep one per run, and use it only when photos are not randomly augmented: the
mask of one photo then never changes). One sampler instance is shared by every loss term
with the same settings (`shared_sampler`), so the CLIP weights are loaded once.
"""
from __future__ import annotations

import functools
from typing import Hashable

import torch

from zsbir.errors import ZsbirError
from zsbir.models.clip_common import TextEmbeddings, class_texts, create_clip
from zsbir.models.clip_surgery import SURGERY_DEPTH, feature_surgery, surgery_tokens


class VxLConfigError(ZsbirError):
    """The VxL sampler's settings cannot work (bad mask ratio, grid that does not fit the encoder)."""


def kept_count(n_patches: int, mask_ratio: float) -> int:
    """How many patches a mask ratio keeps: round((1 - ratio) * n), at least one."""
    return max(1, int(round((1.0 - mask_ratio) * n_patches)))


def most_relevant(relevance: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices (B x n_keep, ascending) of the n_keep highest scores of each row; ties to the lower index."""
    order = torch.sort(relevance, dim=1, descending=True, stable=True).indices
    return order[:, :n_keep].sort(dim=1).values


SCORINGS = ("surgery", "plain")


class VxLSampler:
    def __init__(self, arch: str = "ViT-B-16", pretrained: str | None = "openai", image_size: int = 224,
                 mask_ratio: float = 0.7, text_template: str = "{}", tiny: bool = False, scoring: str = "surgery",
                 surgery_blocks: int = SURGERY_DEPTH, redundant_text: str = "a"):
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise VxLConfigError(f"vxl.mask_ratio must be in [0, 1) (the fraction of patches masked), got {mask_ratio}")
        if scoring not in SCORINGS:
            raise VxLConfigError(f"vxl.scoring must be one of {list(SCORINGS)} (surgery: CLIP Surgery as PuXIM's "
                                 f"official code; plain: plain CLIP patch-text cosine), got {scoring!r}")
        if int(surgery_blocks) < 1:
            raise VxLConfigError(f"vxl.surgery_blocks must be at least 1 (the official CS-ViT-B/16 uses "
                                 f"{SURGERY_DEPTH}; scoring=plain turns the surgery off), got {surgery_blocks}")
        self.scoring, self.surgery_blocks, self.redundant_text = scoring, int(surgery_blocks), redundant_text
        if pretrained is None and not tiny:
            raise VxLConfigError("vxl.pretrained is null: a random CLIP scores patches at random. Set it to 'openai' "
                                 "or a local open_clip ViT-B-16 weights file")
        self.mask_ratio = float(mask_ratio)
        self.text_template = text_template
        self.model, tokenizer = create_clip(arch, pretrained, image_size, tiny, "vxl.pretrained", VxLConfigError)
        self.model.eval().requires_grad_(False)
        visual = self.model.visual
        if visual.attn_pool is not None or visual.final_ln_after_pool or visual.proj is None:
            raise VxLConfigError(f"vxl.arch={arch}: the patch-text score needs a CLS-token ViT with ln_post and proj")
        if scoring == "surgery" and not all(getattr(block.attn, "in_proj_weight", None) is not None
                                            for block in visual.transformer.resblocks):
            raise VxLConfigError(f"vxl.arch={arch}: CLIP Surgery needs blocks with a packed q/k/v projection "
                                 "(open_clip's standard ViT, e.g. ViT-B-16); use vxl.scoring=plain for this model")
        visual.output_tokens = True
        self.encode_texts = TextEmbeddings(self.model, tokenizer)  # L2-normalised embeddings of strings, cached
        self.grid = tuple(int(n) for n in visual.grid_size)
        self._visual = visual  # or its torch.compile'd version (trainer.compile)

    def compile(self, backend: str) -> None:
        if self._visual is self.model.visual:  # the sampler is shared: compile once
            self._visual = torch.compile(self.model.visual, backend=backend)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_keep(self) -> int:
        return kept_count(self.n_patches, self.mask_ratio)

    def _device(self) -> torch.device:
        return self.model.logit_scale.device

    def text_embeddings(self, class_names: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings of the template filled with each class name."""
        return self.encode_texts(class_texts(self.text_template, class_names))

    @torch.no_grad()
    def relevance(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Relevance of every patch to its image's class text: B x patches (see the module docstring).

        `images` are CLIP-normalised; `text` holds one L2-normalised class embedding per image.
        """
        visual = self.model.visual
        images = images.to(self._device(), visual.conv1.weight.dtype)
        text = text.float().to(self._device())
        if self.scoring == "plain":
            _, tokens = self._visual(images)
            patches = torch.nn.functional.normalize(tokens @ visual.proj, dim=-1)
            return torch.einsum("bpd,bd->bp", patches.float(), text)
        # CLIP Surgery runs the blocks itself (zsbir/models/clip_surgery.py), so it never uses the compiled module.
        tokens = torch.nn.functional.normalize(surgery_tokens(visual, images, self.surgery_blocks).float(), dim=-1)
        neutral = self.encode_texts([self.redundant_text]).float().expand(len(text), -1)
        return feature_surgery(tokens, torch.stack([neutral, text], dim=1))[:, 1:, 1]

    @torch.no_grad()
    def keep_index(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                   photo_ids: list[Hashable] | None = None,
                   cache: dict[Hashable, torch.Tensor] | None = None) -> torch.Tensor:
        """Indices (B x n_keep, ascending) of the patches to keep; computed for cache misses only.

        `images` are CLIP-normalised. With `photo_ids` (one key per image that names it
        uniquely, e.g. its index in the training photo list) and a `cache` dict, results
        are looked up in and stored into `cache` under those keys.
        """
        self.model.to(images.device)
        if photo_ids is None or cache is None:
            text = self.text_embeddings(class_names)[labels.to(self._device())]
            return most_relevant(self.relevance(images, text), self.n_keep).to(images.device)
        ids = list(photo_ids)
        missing = [row for row, photo in enumerate(ids) if photo not in cache]
        if missing:
            rows = torch.tensor(missing, device=images.device)
            text = self.text_embeddings(class_names)[labels.to(self._device())[rows.to(self._device())]]
            fresh = most_relevant(self.relevance(images[rows], text), self.n_keep).cpu()
            for row, kept in zip(missing, fresh):
                cache[ids[row]] = kept
        return torch.stack([cache[photo] for photo in ids]).to(images.device)

    def check_grid(self, encoder_grid: tuple[int, int]) -> None:
        if tuple(encoder_grid) != self.grid:
            raise VxLConfigError(
                f"the VxL CLIP sees a {self.grid[0]}x{self.grid[1]} patch grid but the encoder a "
                f"{encoder_grid[0]}x{encoder_grid[1]} one, so a mask cannot be carried over. Use the same patch size "
                "and input size for both (ViT-B/16 at 224 px: 14x14 for both; vxl.image_size follows data.image_size)"
            )


@functools.lru_cache(maxsize=4)
def shared_sampler(arch: str, pretrained: str | None, image_size: int, mask_ratio: float, text_template: str,
                   tiny: bool, scoring: str = "surgery", surgery_blocks: int = SURGERY_DEPTH,
                   redundant_text: str = "a") -> VxLSampler:
    """One sampler per distinct setting, shared by the loss terms that use it."""
    return VxLSampler(arch, pretrained, image_size, mask_ratio, text_template, tiny, scoring, surgery_blocks,
                      redundant_text)
