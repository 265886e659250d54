"""From a `data` config to the split's file lists and DataLoaders.

Every dataset, synthetic or real, is read through the same file-list loader. The data
config names the dataset root, the split folder and the list files (`data.lists`):
`train_sketch`, `train_photo`, `val_sketch` (seen-class validation sketches; optional),
`zero_sketch`, `zero_photo`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from zsbir.data.filelist import DatasetError, FileList, check_labels, read_class_file, read_filelist
from zsbir.data.pairs import EpochBatchSampler, ImageListDataset, TripletDataset, seed_worker
from zsbir.data.transforms import build_transform

log = logging.getLogger(__name__)


@dataclass
class SplitData:
    name: str
    root: Path
    seen_classes: list[str]
    unseen_classes: list[str]
    train_sketch: FileList
    train_photo: FileList
    val_sketch: FileList  # seen classes, for model selection only
    val_photo: FileList  # seen-class gallery for validation (a subset of train photos)
    zero_sketch: FileList  # unseen-class queries
    zero_photo: FileList  # unseen-class gallery

    def counts(self) -> dict[str, int]:
        return {
            "seen_classes": len(self.seen_classes),
            "unseen_classes": len(self.unseen_classes),
            **{k: len(getattr(self, k)) for k in ("train_sketch", "train_photo", "val_sketch", "zero_sketch", "zero_photo")},
        }


def dataset_root(data_cfg) -> Path:
    """The dataset root; the synthetic benchmark is generated into the cache on first use."""
    if data_cfg.get("synthetic"):
        from zsbir.data.synthetic import SyntheticSpec, ensure_synthetic

        spec = SyntheticSpec(**data_cfg.synthetic)
        return ensure_synthetic(data_cfg.cache_dir, spec)
    return Path(str(data_cfg.root)).expanduser()


def _subset(filelist: FileList, keep: np.ndarray, source: str) -> FileList:
    keep = np.sort(keep)
    lines = [filelist.line_numbers[i] for i in keep] if filelist.line_numbers else []
    return FileList([filelist.paths[i] for i in keep], [filelist.labels[i] for i in keep], source, lines)


def load_split(data_cfg, seed: int = 0) -> SplitData:
    root = dataset_root(data_cfg)
    split = root / str(data_cfg.split_dir)
    if not split.is_dir():
        raise DatasetError(
            f"dataset split folder not found: {split}. Prepare the dataset with "
            f"`python -m zsbir.data.prepare data={data_cfg.name}` or point paths.data_dir at it "
            "(environment variable ZSBIR_DATA)"
        )
    seen = read_class_file(split / "cname_cid.txt")
    unseen = read_class_file(split / "cname_cid_zero.txt")
    lists = data_cfg.lists

    def read(key: str, classes: list[str], class_file: str) -> FileList:
        filelist = read_filelist(split / str(lists[key]))
        check_labels(filelist, len(classes), class_file)
        return filelist

    train_sketch = read("train_sketch", seen, "cname_cid.txt")
    train_photo = read("train_photo", seen, "cname_cid.txt")
    zero_sketch = read("zero_sketch", unseen, "cname_cid_zero.txt")
    zero_photo = read("zero_photo", unseen, "cname_cid_zero.txt")
    rng = np.random.default_rng(seed)
    if lists.get("val_sketch"):
        val_sketch = read("val_sketch", seen, "cname_cid.txt")
    else:  # no public seen-class validation list: hold out part of the training sketches
        n_val = max(1, int(len(train_sketch) * float(data_cfg.val_fraction)))
        held = rng.permutation(len(train_sketch))
        val_sketch = _subset(train_sketch, held[:n_val], f"{train_sketch.source} (held out {n_val})")
        train_sketch = _subset(train_sketch, held[n_val:], train_sketch.source)
        log.info("no seen-class validation list: holding out %d training sketches for model selection", n_val)
    gallery_size = min(len(train_photo), int(data_cfg.val_gallery_size))
    val_photo = _subset(train_photo, rng.permutation(len(train_photo))[:gallery_size],
                        f"{train_photo.source} (validation gallery of {gallery_size})")
    data = SplitData(str(data_cfg.name), root, seen, unseen, train_sketch, train_photo, val_sketch, val_photo,
                     zero_sketch, zero_photo)
    cap = data_cfg.get("max_per_class")
    if cap:
        for key in ("train_sketch", "train_photo", "val_sketch", "val_photo", "zero_sketch", "zero_photo"):
            setattr(data, key, cap_per_class(getattr(data, key), int(cap), seed))
        log.info("data.max_per_class=%d: using at most %d items per class of every list", cap, cap)
    else:
        _check_counts(data, data_cfg.get("counts"))
    return data


def cap_per_class(filelist: FileList, cap: int, seed: int) -> FileList:
    """A seeded subset with at most `cap` items of each class (for debug runs)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(filelist.labels)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in np.unique(labels)]
    return _subset(filelist, np.concatenate(keep), filelist.source)


def _check_counts(data: SplitData, expected) -> None:
    if not expected:
        return
    actual = data.counts()
    wrong = {k: (int(v), actual[k]) for k, v in expected.items() if v is not None and k in actual and actual[k] != int(v)}
    if wrong:
        detail = ", ".join(f"{k}: expected {e}, found {a}" for k, (e, a) in wrong.items())
        raise DatasetError(
            f"dataset '{data.name}' at {data.root} has unexpected counts ({detail}); the download is "
            f"incomplete or the lists were edited. Re-run `python -m zsbir.data.prepare data={data.name}`"
        )


def transforms_for(data_cfg, norm: str, train: bool) -> dict:
    size = int(data_cfg.image_size)
    augment = str(data_cfg.augment)
    uint8 = train and bool(data_cfg.get("gpu_augment"))  # the trainer augments and normalises on the device
    return {d: build_transform(d, size, norm, augment, train=train, uint8=uint8) for d in ("sketch", "photo")}


def _generator(seed: int) -> torch.Generator:
    # Loaders own a generator, so creating an iterator never draws from torch's global RNG
    # (which would make a resumed run diverge from an uninterrupted one).
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def train_loader(data: SplitData, data_cfg, norm: str, views: tuple[str, ...], seed: int,
                 rank: int = 0, world_size: int = 1) -> DataLoader:
    dataset = TripletDataset(data.root, data.train_sketch, data.train_photo, transforms_for(data_cfg, norm, train=True),
                             views=views, seed=seed, cache_images=bool(data_cfg.get("cache_images")))
    balanced = data_cfg.get("balanced") or {}
    sampler = EpochBatchSampler(data.train_sketch.labels, int(data_cfg.batch_size), seed=seed, rank=rank,
                                world_size=world_size, classes_per_batch=balanced.get("classes_per_batch"),
                                items_per_class=balanced.get("items_per_class"))
    workers = int(data_cfg.num_workers)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, worker_init_fn=seed_worker,
                      generator=_generator(seed), pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def eval_loader(data: SplitData, filelist: FileList, domain: str, data_cfg, norm: str) -> DataLoader:
    transform = build_transform(domain, int(data_cfg.image_size), norm, train=False)
    dataset = ImageListDataset(data.root, filelist, transform, cache_images=bool(data_cfg.get("cache_images")))
    workers = int(data_cfg.num_workers)
    return DataLoader(dataset, batch_size=int(data_cfg.eval_batch_size), shuffle=False, num_workers=workers,
                      generator=_generator(0), pin_memory=torch.cuda.is_available())
