"""Two-stream training batches (`data.sampler: streams`): SAKE's and DSN's batch composition.

SAKE and DSN do not train on triplets: they draw a batch of sketches and a batch of photos
from two independent, shuffled, class-labelled loaders and stop the epoch when the shorter
one runs out (SAKE train_cse_resnet_sketchy_ext.py:129-135 and :193; DSN
train_cse_resnet_sketchy_ext.py:163-169 and :272-273). The sketch and photo counts per
step are `data.stream_batch.sketch` / `data.stream_batch.photo` (e.g. 13 + 26 on Sketchy,
4 + 36 on TU-Berlin for SAKE).

Batches hold the views `sketch` and `photo` (labels `label` / `photo_label`, list
indices `index` / `photo_index`) and, when a loss term asks for them, extra augmented views
of the same images: `sketch_v2`, `sketch_v3`, `photo_v2`, `photo_v3` (DSN's two
contrastive views). As with triplets, every random choice is seeded by (seed, epoch,
index), an epoch is a fresh pair of permutations, a resumed run skips the batches it has
trained on, and under DDP every rank takes every `world_size`-th batch of the same global
sequence (`stream_batch` is per process, like `data.batch_size`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from zsbir.data.filelist import DatasetError, FileList
from zsbir.data.imagecache import PreResizedImages
from zsbir.data.pairs import TWO_STREAM_SAMPLER_STREAM, ImageSource, item_seed
from zsbir.data.views import STREAM_VIEWS, TRIPLET_VIEWS, VIEWS

SKETCH, PHOTO = 0, 1


def stream_views(views: tuple[str, ...]) -> tuple[str, ...]:
    """The views checked against what two-stream batches hold; a clear error for triplet-only views."""
    unknown = [v for v in views if v not in STREAM_VIEWS]
    if unknown:
        hint = " (views of triplet batches: set data.sampler=triplets)" if set(unknown) <= set(TRIPLET_VIEWS) else ""
        raise DatasetError(f"two-stream batches (data.sampler=streams) have no views {unknown}{hint}; they have "
                           f"{list(STREAM_VIEWS)}: set each loss term's `views` to these (e.g. loss.ce.views=[sketch,photo])")
    return views


class StreamDataset(Dataset):
    """Seeded sketch and photo items; indexed by (epoch, SKETCH or PHOTO, index in that list)."""

    def __init__(self, root: Path, sketches: FileList, photos: FileList, transforms: dict[str, Callable],
                 views: tuple[str, ...], seed: int = 0, keep_decoded_in_memory: bool = False,
                 pixels: PreResizedImages | None = None):
        self.root, self.lists = Path(root), {SKETCH: sketches, PHOTO: photos}
        self.transforms, self.views, self.seed = transforms, stream_views(tuple(views)), seed
        self.cache = ImageSource(keep_decoded_in_memory, pixels)

    def __len__(self) -> int:
        return len(self.lists[SKETCH]) + len(self.lists[PHOTO])

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, domain_id, index = key
        domain = "sketch" if domain_id == SKETCH else "photo"
        filelist = self.lists[domain_id]
        image: Image.Image = self.cache.get(self.root, filelist, index, domain)
        item = {"domain": domain_id, "label": filelist.labels[index], "index": index}
        for view in self.views:
            if VIEWS[view].domain != domain:
                continue
            # Each view's randomness depends only on (seed, epoch, index, view); torch's global
            # generator is forked so the main process's stream is untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, epoch, index, 1 + STREAM_VIEWS.index(view)))
                item[view] = self.transforms.get(view, self.transforms[domain])(image)
        return item


def collate_streams(items: list[dict]) -> dict:
    """Items of both streams -> one batch: `sketch*` / `photo*` views, labels and list indices."""
    batch: dict = {}
    for domain_id, label_key, index_key in ((SKETCH, "label", "index"), (PHOTO, "photo_label", "photo_index")):
        mine = [item for item in items if item["domain"] == domain_id]
        batch[label_key] = torch.tensor([item["label"] for item in mine], dtype=torch.long)
        batch[index_key] = torch.tensor([item["index"] for item in mine], dtype=torch.long)
        for view in (mine[0].keys() - {"domain", "label", "index"}) if mine else ():
            batch[view] = torch.stack([item[view] for item in mine])
    return batch


class StreamBatchSampler(Sampler):
    """Batches of `sketch_batch` sketch keys + `photo_batch` photo keys from two seeded permutations.

    An epoch ends with the shorter stream (whole batches only). `set_epoch(epoch,
    start_batch)` positions the sampler as EpochBatchSampler's does.
    """

    def __init__(self, n_sketches: int, n_photos: int, sketch_batch: int, photo_batch: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.sizes = {SKETCH: int(n_sketches), PHOTO: int(n_photos)}
        self.batch = {SKETCH: int(sketch_batch), PHOTO: int(photo_batch)}
        self.seed, self.rank, self.world_size = seed, rank, world_size
        for domain_id, name, plural in ((SKETCH, "sketch", "sketches"), (PHOTO, "photo", "photos")):
            if self.batch[domain_id] < 1:
                raise ValueError(f"data.stream_batch.{name}={self.batch[domain_id]}: must be >= 1")
            if self.sizes[domain_id] < self.batch[domain_id] * world_size:
                raise ValueError(f"data.stream_batch.{name}={self.batch[domain_id]} x {world_size} ranks exceeds the "
                                 f"{self.sizes[domain_id]} training {plural}; lower data.stream_batch.{name}")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self) -> int:
        """Whole batches in one pass of the shorter stream, over all ranks."""
        return min(self.sizes[d] // self.batch[d] for d in (SKETCH, PHOTO))

    def batches_per_epoch(self) -> int:
        return self.global_batches() // self.world_size

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        rng = np.random.default_rng(item_seed(self.seed, self.epoch, 0, stream=TWO_STREAM_SAMPLER_STREAM))
        orders = {d: rng.permutation(self.sizes[d]) for d in (SKETCH, PHOTO)}
        usable = self.batches_per_epoch() * self.world_size
        mine = list(range(self.rank, usable, self.world_size))
        for b in mine[self.start_batch:]:
            yield [(self.epoch, d, int(i)) for d in (SKETCH, PHOTO)
                   for i in orders[d][b * self.batch[d]:(b + 1) * self.batch[d]]]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)
