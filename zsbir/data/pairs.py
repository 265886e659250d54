"""Datasets and samplers: evaluation image lists and seeded training triplets.

A training item is an anchor sketch, a positive photo of the same class and a negative
photo of a DIFFERENT class (plus second augmented views when a loss asks for them).
Samplers yield `(epoch, index)` pairs, and every random choice of an item (positive,
negative, augmentation) is drawn from a generator seeded by `(seed, epoch, index)`: the
data are reproducible from the seed, differ every epoch, do not depend on the number of
DataLoader workers, and a run resumed mid-epoch sees exactly the batches it would have.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from zsbir.data.filelist import DatasetError, FileList
from zsbir.data.imagecache import PreResizedImages
from zsbir.data.views import STREAM_VIEWS, TRIPLET_VIEWS, VIEWS
from zsbir.engine.preemption import ignore_stop_signals
from zsbir.errors import ConfigError


def load_image(root: Path, filelist: FileList, index: int) -> Image.Image:
    path = root / filelist.paths[index]
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        line = filelist.line_numbers[index] if filelist.line_numbers else "?"
        raise DatasetError(
            f"cannot read image {path} (listed in {filelist.source}, line {line}): {err}. Re-extract the dataset, "
            "or find every unreadable file with `python -m zsbir.data.prepare data=<name> verify=true`; "
            "data.strict=false then skips them"
        ) from err


# Every item_seed stream, in one place so that no two users draw the same numbers:
# 0: an item's positive and negative photo (TripletDataset);
# 1..len(views): the CPU augmentation of each view of an item (TripletDataset, StreamDataset).
SAMPLER_STREAM = 999  # the batch order of an epoch (EpochBatchSampler)
LOADER_STREAM = 998  # the train DataLoader's generator (Trainer)
TWO_STREAM_SAMPLER_STREAM = 997  # the permutations of two-stream batches (StreamBatchSampler, data/streams.py)
GPU_AUGMENT_STREAMS = 1000  # + view number: GPU-side augmentation (zsbir/data/gpu_augment.py)


def item_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed that depends on all of (seed, epoch, index, stream)."""
    return int(np.random.SeedSequence([seed, epoch, index, stream]).generate_state(1, np.uint64)[0] >> 1)


class ImageSource:
    """Where images come from: the pre-resized uint8 arrays when given (`data.preresized_folder`), else
    the files, decoded ones kept in memory (per process) with `keep_decoded_in_memory` (small datasets only)."""

    def __init__(self, keep_decoded_in_memory: bool, pixels: PreResizedImages | None = None):
        self.keep_decoded_in_memory, self.pixels = keep_decoded_in_memory, pixels
        self.images: dict[tuple[str, int], Image.Image] = {}

    def get(self, root: Path, filelist: FileList, index: int, domain: str) -> Image.Image:
        if self.pixels is not None:
            return self.pixels.image(domain, filelist.paths[index])
        if not self.keep_decoded_in_memory:
            return load_image(root, filelist, index)
        key = (filelist.source, index)
        if key not in self.images:
            self.images[key] = load_image(root, filelist, index)
        return self.images[key]


class ImageListDataset(Dataset):
    """One file list (a query or gallery set) for embedding: returns (image, label, index)."""

    def __init__(self, root: Path, filelist: FileList, transform: Callable, keep_decoded_in_memory: bool = False,
                 domain: str | None = None, pixels: PreResizedImages | None = None):
        if pixels is not None and domain not in ("sketch", "photo"):
            raise ValueError(f"reading from an image cache needs domain='sketch' or 'photo', got {domain!r}")
        self.root, self.filelist, self.transform, self.domain = Path(root), filelist, transform, domain
        self.cache = ImageSource(keep_decoded_in_memory, pixels)

    def __len__(self) -> int:
        return len(self.filelist)

    def __getitem__(self, index: int):
        image = self.cache.get(self.root, self.filelist, index, self.domain)
        return self.transform(image), self.filelist.labels[index], index


class TripletDataset(Dataset):
    """Seeded (sketch, positive photo, negative photo) items; indexed by (epoch, sketch index)."""

    def __init__(self, root: Path, sketches: FileList, photos: FileList, transforms: dict[str, Callable],
                 views: tuple[str, ...] = ("sketch", "photo_pos", "photo_neg"), seed: int = 0,
                 keep_decoded_in_memory: bool = False, pixels: PreResizedImages | None = None):
        unknown = set(views) - set(TRIPLET_VIEWS)
        if unknown:
            hint = (" (views of two-stream batches: set data.sampler=streams)" if unknown <= set(STREAM_VIEWS) else "")
            raise ValueError(f"triplet batches (data.sampler=triplets) have no views {sorted(unknown)}{hint}; "
                             f"they have {list(TRIPLET_VIEWS)}")
        self.root, self.sketches, self.photos = Path(root), sketches, photos
        self.transforms, self.views, self.seed = transforms, tuple(views), seed
        self.cache = ImageSource(keep_decoded_in_memory, pixels)
        labels = np.asarray(photos.labels)
        self.photos_by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        self.photo_classes = np.array(sorted(self.photos_by_class))
        missing = sorted(set(sketches.labels) - set(self.photos_by_class))
        if missing:
            raise DatasetError(f"classes {missing[:10]} have sketches but no photos in {photos.source}")
        if len(self.photo_classes) < 2:
            raise DatasetError("triplets need photos of at least two classes")

    def __len__(self) -> int:
        return len(self.sketches)

    def pick(self, index: int, rng: np.random.Generator) -> dict:
        """The item's labels and list indices: a random photo of the sketch's class, one of another class."""
        label = self.sketches.labels[index]
        pos = int(rng.choice(self.photos_by_class[label]))
        others = self.photo_classes[self.photo_classes != label]
        neg_label = int(rng.choice(others))
        neg = int(rng.choice(self.photos_by_class[neg_label]))
        # pos_index / neg_index: the photos' indices in the training photo list (PuXIM caches
        # its per-photo patch masks under them)
        return {"label": label, "neg_label": neg_label, "index": index, "pos_index": pos, "neg_index": neg}

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rng = np.random.default_rng(item_seed(self.seed, epoch, index))
        item = self.pick(index, rng)
        loaded: dict[tuple[int, int], Image.Image] = {}
        for stream, view in enumerate(self.views):
            domain = VIEWS[view].domain
            filelist, i = (self.sketches if domain == "sketch" else self.photos), item[VIEWS[view].index_key]
            cache_key = (id(filelist), i)
            if cache_key not in loaded:
                loaded[cache_key] = self.cache.get(self.root, filelist, i, domain)
            # Augmentations draw from torch's global generator: fork it so the main process's
            # stream is untouched and this view's randomness depends only on (seed, epoch, index).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, epoch, index, stream + 1))
                item[view] = self.transforms.get(view, self.transforms[domain])(loaded[cache_key])
        return item


class EpochBatchSampler(Sampler):
    """Batches of (epoch, index) keys: a fresh seeded permutation every epoch.

    `set_epoch(epoch, start_batch)` positions the sampler, so a resumed run skips the
    batches it already trained on. With `world_size > 1` every rank takes every
    `world_size`-th batch of the same permutation (batches are never split).
    With `classes_per_batch` (P) and `items_per_class` (K), batches hold K sketches of
    each of P distinct classes (class-balanced mode).
    """

    def __init__(self, labels: list[int], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 classes_per_batch: int | None = None, items_per_class: int | None = None):
        self.labels = np.asarray(labels)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.balanced = bool(classes_per_batch and items_per_class)
        if self.balanced:
            self.P, self.K = int(classes_per_batch), int(items_per_class)
            self.batch_size = self.P * self.K
            n_classes = len(np.unique(self.labels))
            if self.P > n_classes:
                raise ConfigError(f"data.balanced.classes_per_batch={self.P} exceeds the {n_classes} training "
                                  f"classes: set it to at most {n_classes}")
        else:
            self.batch_size = int(batch_size)
        if len(self.labels) < self.batch_size * world_size:
            raise ConfigError(
                f"a batch of {self.batch_size} sketches x {world_size} process(es) exceeds the {len(self.labels)} "
                f"training sketches: set data.batch_size (or data.balanced) to at most "
                f"{len(self.labels) // world_size} sketches per batch, or use more data")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return (len(self.labels) // self.batch_size) // self.world_size

    def _global_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng(item_seed(self.seed, self.epoch, 0, stream=SAMPLER_STREAM))
        n_batches = len(self.labels) // self.batch_size
        if not self.balanced:
            order = rng.permutation(len(self.labels))
            return [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n_batches)]
        by_class = {c: rng.permutation(np.flatnonzero(self.labels == c)) for c in np.unique(self.labels)}
        batches = []
        for _ in range(n_batches):
            classes = rng.choice(sorted(by_class), size=self.P, replace=False)
            # K items per class, with replacement only if a class has fewer than K items.
            batch = [rng.choice(by_class[c], size=self.K, replace=len(by_class[c]) < self.K) for c in classes]
            batches.append(np.concatenate(batch))
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self._global_batches()
        usable = (len(batches) // self.world_size) * self.world_size
        mine = batches[self.rank:usable:self.world_size]
        for batch in mine[self.start_batch:]:
            yield [(self.epoch, int(i)) for i in batch]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: derive NumPy/Python seeds from torch's per-worker seed; stop
    signals are left to the main process (it saves last.pt, then shuts the workers down)."""
    import random

    ignore_stop_signals()
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
