"""Auxiliary network passes: networks a loss term reads, run by the training step.

SAKE's distillation reads a frozen ImageNet teacher's logits; PuXIM's terms read the
encoder run again on the photo patches the VxL sampler keeps. Such passes are networks,
not loss math, so they run inside `TrainStep.forward` right after the encoder: under the
same autocast, compiled when the encoder is (trainer.compile) and inside the DDP module.
Each pass adds its results to the per-view encoder outputs (`outputs[view][key]`), which
the loss terms then read like any other encoder output, in float32.

A loss term declares the passes it needs in `auxiliary_passes`; passes with equal `key`
run once per step however many terms read them (PuXIM's two terms share one masked pass).
"""
from __future__ import annotations

from typing import Hashable

import torch

from zsbir.data.views import VIEWS
from zsbir.models.encoder import EncoderOutput, renormalize


class AuxiliaryPass:
    """Base class. `key` identifies the pass (equal keys: one run per step)."""

    @property
    def key(self) -> Hashable:  # pragma: no cover
        raise NotImplementedError

    def prepare(self, encoder, class_names: list[str]) -> None:
        """Called once before training (and before a resume) with the plain encoder and the seen classes."""

    def compile(self, backend: str) -> None:
        """Compile the pass's own network (trainer.compile=true)."""

    def __call__(self, batch: dict, outputs: dict, encoder) -> None:  # pragma: no cover
        raise NotImplementedError


class TeacherLogits(AuxiliaryPass):
    """`outputs[view]["teacher_logits"]`: a frozen classifier's logits of the view's images.

    The images are re-normalised from the encoder's normalisation to the teacher's.
    """

    output_key = "teacher_logits"

    def __init__(self, teacher: torch.nn.Module, teacher_norm: str, views: tuple[str, ...]):
        self.teacher, self.teacher_norm, self.views = teacher, teacher_norm, tuple(views)
        self._forward = teacher

    @property
    def key(self) -> Hashable:
        return ("teacher", id(self.teacher), self.teacher_norm, self.views)

    def compile(self, backend: str) -> None:
        self._forward = torch.compile(self.teacher, backend=backend)

    @torch.no_grad()
    def __call__(self, batch: dict, outputs: dict, encoder) -> None:
        views = [v for v in self.views if v in outputs]
        images = torch.cat([batch[v] for v in views])
        if next(self.teacher.parameters()).device != images.device:
            self.teacher.to(images.device)
        logits = self._forward(renormalize(images, encoder.norm, self.teacher_norm))
        for view, part in zip(views, logits.split([len(batch[v]) for v in views])):
            outputs[view][self.output_key] = part


class MaskedPhotoPass(AuxiliaryPass):
    """PuXIM's purified photos: the encoder run again on the patches the VxL sampler keeps.

    Adds `masked_tokens` and `masked_keep_index` to `outputs[view]` of the positive and the
    negative photo. With `cache_masks`, each training photo's kept patches are computed once
    (only valid when photos are not randomly augmented).
    """

    masked_views = ("photo_pos", "photo_neg")

    def __init__(self, sampler, cache_masks: bool):
        self.sampler, self.cache_masks = sampler, bool(cache_masks)
        self.class_names: list[str] = []
        self.mask_cache: dict[int, torch.Tensor] = {}  # training-photo index -> kept patches, for this run
        self._backend: str | None = None
        self._compiled: tuple = (None, None)  # (encoder, compiled encode_masked)

    @property
    def key(self) -> Hashable:
        return ("masked_photos", id(self.sampler), self.cache_masks)

    def prepare(self, encoder, class_names: list[str]) -> None:
        self.class_names = list(class_names)

    def compile(self, backend: str) -> None:
        self._backend = backend
        self.sampler.compile(backend)

    def _encode_masked(self, encoder):
        if self._backend is None:
            return encoder.encode_masked
        if self._compiled[0] is not encoder:
            self._compiled = (encoder, torch.compile(encoder.encode_masked, backend=self._backend))
        return self._compiled[1]

    def __call__(self, batch: dict, outputs: dict, encoder) -> None:
        views = [VIEWS[v] for v in self.masked_views]
        images = torch.cat([batch[v.name] for v in views])
        labels = torch.cat([batch[v.label_key] for v in views])
        photo_ids = None
        if self.cache_masks:
            photo_ids = [int(i) for i in torch.cat([batch[v.index_key] for v in views]).tolist()]
        keep_index = self.sampler.keep_index(renormalize(images, encoder.norm, "clip"), labels, self.class_names,
                                             photo_ids, self.mask_cache if self.cache_masks else None)
        out: EncoderOutput = self._encode_masked(encoder)(images, "photo", keep_index)
        for view, tokens, kept in zip(self.masked_views, out["tokens"].chunk(len(views)), keep_index.chunk(len(views))):
            outputs[view]["masked_tokens"], outputs[view]["masked_keep_index"] = tokens, kept


class RelationPairsPass(AuxiliaryPass):
    """ZSE-SBIR's pair network on the step's (sketch, positive photo) and (sketch, negative photo) pairs.

    One `encoder.relate` call over the 2B pairs; adds to `outputs[photo view]` the pair's
    cross-attended CLS tokens (`pair_sketch_cls`, `pair_photo_cls`) and `relation_logit`.
    The encoder outputs' "sequence" (CLS + patch tokens) is what the pairs read.
    """

    paired_views = ("photo_pos", "photo_neg")
    key = ("relation_pairs",)

    def __call__(self, batch: dict, outputs: dict, encoder) -> None:
        sketch = outputs["sketch"]["sequence"]
        photos = torch.cat([outputs[view]["sequence"] for view in self.paired_views])
        pairs = encoder.relate(sketch.repeat(len(self.paired_views), 1, 1), photos)
        for i, view in enumerate(self.paired_views):
            rows = slice(i * len(sketch), (i + 1) * len(sketch))
            outputs[view]["pair_sketch_cls"] = pairs["sketch_cls"][rows]
            outputs[view]["pair_photo_cls"] = pairs["photo_cls"][rows]
            outputs[view]["relation_logit"] = pairs["relation_logit"][rows]


def patch_permutations(seeds: torch.Tensor, n_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two different permutations of `n_patches` per item, drawn from the item's `shuffle_seed`.

    (B x n_patches) each, on the CPU; the second differs from the first in every row (a
    negative pair must be shuffled differently), by redrawing until it does.
    """
    if n_patches < 2:
        raise ValueError("patch shuffling needs a grid of at least 2 patches")
    same, other = [], []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(int(seed))
        first = torch.randperm(n_patches, generator=g)
        second = torch.randperm(n_patches, generator=g)
        while torch.equal(first, second):
            second = torch.randperm(n_patches, generator=g)
        same.append(first)
        other.append(second)
    return torch.stack(same), torch.stack(other)


def shuffle_patches(images: torch.Tensor, grid: int, permutations: torch.Tensor) -> torch.Tensor:
    """Cut each image into grid x grid patches and lay them out again in its permutation's order.

    Patch k of the output (row-major) is patch `permutations[b, k]` of the input image b.
    """
    b, c, h, w = images.shape
    if h % grid or w % grid:
        raise ValueError(f"patch shuffling with a {grid}x{grid} grid needs an image size divisible by {grid}, "
                         f"got {h}x{w}: change loss.patch_shuffle.grid or data.image_size")
    ph, pw = h // grid, w // grid
    patches = images.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, pw)
    index = permutations.to(images.device)[:, :, None, None, None].expand_as(patches)
    shuffled = patches.gather(1, index)
    return shuffled.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class PatchShufflePass(AuxiliaryPass):
    """Sketch_LVM's patch shuffling: the encoder run on shuffled sketches and photos.

    Per item, permutation A shuffles the sketch and its photo (a positive pair: the same
    layout), permutation B != A shuffles the photo again (the negative). Adds
    `outputs["sketch"]["shuffled_embedding"]`, `outputs["photo_pos"]["shuffled_embedding"]`
    (permutation A) and `outputs["photo_pos"]["reshuffled_embedding"]` (permutation B).
    The permutations come from each item's `shuffle_seed` (data.sampler=instances).
    """

    def __init__(self, grid: int):
        self.grid = int(grid)

    @property
    def key(self) -> Hashable:
        return ("patch_shuffle", self.grid)

    def __call__(self, batch: dict, outputs: dict, encoder) -> None:
        if "shuffle_seed" not in batch:
            raise KeyError("patch shuffling needs instance triplets (data.sampler=instances): the batch has no "
                           "shuffle_seed")
        same, other = patch_permutations(batch["shuffle_seed"].cpu(), self.grid * self.grid)
        sketch, photo = batch["sketch"], batch["photo_pos"]
        outputs["sketch"]["shuffled_embedding"] = encoder(shuffle_patches(sketch, self.grid, same), "sketch")["embedding"]
        photos = torch.cat([shuffle_patches(photo, self.grid, same), shuffle_patches(photo, self.grid, other)])
        embedded = encoder(photos, "photo")["embedding"]
        outputs["photo_pos"]["shuffled_embedding"], outputs["photo_pos"]["reshuffled_embedding"] = embedded.chunk(2)
