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

from zsbir.data.filelist import (DatasetError, FileList, build_filelist_from_folders, check_labels, find_missing,
                                 read_class_file, read_filelist)
from zsbir.data.imagecache import PreResizedImages
from zsbir.data.instance_triplets import InstanceTripletDataset
from zsbir.data.instances import paired_subset, restrict_to_instances
from zsbir.data.pairs import EpochBatchSampler, ImageListDataset, TripletDataset, seed_worker
from zsbir.data.streams import StreamBatchSampler, StreamDataset, collate_streams
from zsbir.data.transforms import build_transform
from zsbir.engine.preemption import ignore_stop_signals

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
    pixels: PreResizedImages | None = None  # the pre-resized image cache (data.preresized_folder), if any
    split_dir: Path | None = None  # the benchmark's split folder (class masks etc.); None for a generated one

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
    if data_cfg.get("synthetic_fg"):
        from zsbir.data.synthetic_fg import SyntheticFgSpec, ensure_synthetic_fg

        return ensure_synthetic_fg(data_cfg.cache_dir, SyntheticFgSpec(**data_cfg.synthetic_fg))
    return Path(str(data_cfg.root)).expanduser()


def _subset(filelist: FileList, keep: np.ndarray, source: str) -> FileList:
    keep = np.sort(keep)
    lines = [filelist.line_numbers[i] for i in keep] if filelist.line_numbers else []
    return FileList([filelist.paths[i] for i in keep], [filelist.labels[i] for i in keep], source, lines)


LIST_KEYS = ("train_sketch", "train_photo", "val_sketch", "zero_sketch", "zero_photo")
UNREADABLE_RECORD = "zsbir_unreadable.txt"  # written into the split folder by `prepare verify=true`


def domain_of(list_key: str) -> str:
    """The domain of a file-list key (`train_sketch` -> sketch)."""
    return "sketch" if list_key.endswith("_sketch") else "photo"


def prepare_command(data_cfg, root: Path) -> str:
    return f"python -m zsbir.data.prepare data={data_cfg.name} data.root={root}"


def split_folder(data_cfg) -> tuple[Path, Path]:
    """(dataset root, split folder); a missing split folder is an error that names the prepare command."""
    root = dataset_root(data_cfg)
    split = root / str(data_cfg.split_dir)
    if not split.is_dir():
        raise DatasetError(
            f"dataset split folder not found: {split}. Prepare the dataset with `{prepare_command(data_cfg, root)}`, "
            "or point paths.data_dir at the folder that holds it (environment variable ZSBIR_DATA)"
        )
    return root, split


def read_lists(data_cfg, root: Path, split: Path) -> tuple[list[str], list[str], dict[str, FileList]]:
    """Seen and unseen class names and every configured list, exactly as on disk.

    A train list that is not public (`data.folders` names its image folder, e.g. TU-Berlin
    photos) is built from the seen-class folders when its file is absent, in memory on every
    run (one directory listing per class); `prepare` writes it once into the split folder.
    """
    seen = read_class_file(split / "cname_cid.txt")
    unseen = read_class_file(split / "cname_cid_zero.txt")
    folders = data_cfg.get("folders") or {}
    lists: dict[str, FileList] = {}
    for key in LIST_KEYS:
        name = data_cfg.lists.get(key)
        if not name:
            continue
        classes, class_file = (unseen, "cname_cid_zero.txt") if key.startswith("zero") else (seen, "cname_cid.txt")
        path = split / str(name)
        if not path.is_file() and key in folders:
            lists[key] = build_filelist_from_folders(
                root, str(folders[key]), classes, list(data_cfg.folder_extensions),
                fix=f"Prepare the dataset with `{prepare_command(data_cfg, root)}`")
            log.info("%s: %s is absent (the list is not public): built it from the seen-class folders %s/<class>/ (%d images)",
                     key, name, root / str(folders[key]), len(lists[key]))
        else:
            lists[key] = read_filelist(path, strict=bool(data_cfg.get("strict", True)))
        check_labels(lists[key], len(classes), class_file)
    return seen, unseen, lists


def read_unreadable_record(split: Path) -> set[str]:
    record = split / UNREADABLE_RECORD
    if not record.is_file():
        return set()
    return {line.rstrip("\r\n") for line in record.open(encoding="utf-8") if line.strip()}


def drop_unavailable(lists: dict[str, FileList], root: Path, split: Path, data_cfg,
                     pixels: PreResizedImages | None = None) -> dict[str, FileList]:
    """Find listed images that a run could not read.

    Without an image cache: files that are missing, or recorded unreadable by `prepare
    verify=true`. With `data.preresized_folder`: images absent from the cache (no file access).
    `data.strict=true`: one DatasetError with how many, the first few paths and the fix.
    `data.strict=false`: drop them, with one warning per list giving the count.
    """
    bad = {}
    if pixels is not None:
        for key, filelist in lists.items():
            rows = pixels.rows.get(domain_of(key), {})
            bad[key] = [i for i, p in enumerate(filelist.paths) if p not in rows]
        what, fix = f"absent from the image cache {pixels.folder}", (
            f"Rebuild the cache with `{prepare_command(data_cfg, root)} cache=true`")
    else:
        unreadable = read_unreadable_record(split)
        listings: dict[str, set[str]] = {}
        for key, filelist in lists.items():
            missing = set(find_missing(root, filelist, listings))
            missing |= {i for i, p in enumerate(filelist.paths) if p in unreadable}
            bad[key] = sorted(missing)
        what = "missing or unreadable" + (f" (see {split / UNREADABLE_RECORD})" if unreadable else "")
        fix = f"Prepare the dataset with `{prepare_command(data_cfg, root)}`"
    bad = {k: v for k, v in bad.items() if v}
    if not bad:
        return lists
    if data_cfg.get("strict", True):
        total = sum(len(v) for v in bad.values())
        first = [str(root / lists[k].paths[i]) for k, idx in bad.items() for i in idx[:5]][:5]
        per_list = ", ".join(f"{k}: {len(v)}" for k, v in bad.items())
        raise DatasetError(
            f"{total} listed image{'s are' if total != 1 else ' is'} {what} in dataset '{data_cfg.name}' ({per_list}); "
            f"first: {first}. "
            f"{fix}, or set data.strict=false to skip them"
        )
    out = dict(lists)
    for key, idx in bad.items():
        keep = np.setdiff1d(np.arange(len(lists[key])), idx)
        out[key] = _subset(lists[key], keep, lists[key].source)
        log.warning("data.strict=false: skipping %d of %d %s images that are %s (%s)",
                    len(idx), len(lists[key]), key, what, lists[key].source)
    return out


def load_split(data_cfg, seed: int = 0) -> SplitData:
    """Read, verify and split a dataset: every check happens here, before any DataLoader exists.

    Counts are compared with `data.counts` on the lists as read (before dropping, holding
    out or capping anything); `data.max_per_class` (debug runs) skips that comparison.
    """
    root, split = split_folder(data_cfg)
    seen, unseen, lists = read_lists(data_cfg, root, split)
    cap = data_cfg.get("max_per_class")
    if cap:
        log.info("data.max_per_class=%d: using at most %d items per class of every list; counts not checked", cap, cap)
    else:
        _check_counts(str(data_cfg.name), root, {"seen_classes": len(seen), "unseen_classes": len(unseen),
                                                 **{k: len(v) for k, v in lists.items()}}, data_cfg.get("counts"))
    pixels = PreResizedImages(str(data_cfg.preresized_folder)) if data_cfg.get("preresized_folder") else None
    lists = drop_unavailable(lists, root, split, data_cfg, pixels)
    fine_grained = data_cfg.get("fine_grained")
    if fine_grained:  # instance pairs (zsbir/data/instances.py): photo lists keep the photos with sketches
        lists = restrict_to_instances(lists, fine_grained, str(data_cfg.name))
    train_sketch = lists["train_sketch"]
    rng = np.random.default_rng(seed)
    if "val_sketch" in lists:
        val_sketch = lists["val_sketch"]
    else:  # no public seen-class validation list: hold out part of the training sketches
        n_val = max(1, int(len(train_sketch) * float(data_cfg.val_fraction)))
        held = rng.permutation(len(train_sketch))
        val_sketch = _subset(train_sketch, held[:n_val], f"{train_sketch.source} (held out {n_val})")
        train_sketch = _subset(train_sketch, held[n_val:], train_sketch.source)
        log.info("no seen-class validation list: holding out %d training sketches for model selection", n_val)
    train_photo = lists["train_photo"]
    gallery_size = min(len(train_photo), int(data_cfg.val_gallery_size))
    val_photo = _subset(train_photo, rng.permutation(len(train_photo))[:gallery_size],
                        f"{train_photo.source} (validation gallery of {gallery_size})")
    generated = data_cfg.get("synthetic") or data_cfg.get("synthetic_fg")  # they ship no split files of their own
    data = SplitData(str(data_cfg.name), root, seen, unseen, train_sketch, train_photo, val_sketch, val_photo,
                     lists["zero_sketch"], lists["zero_photo"], pixels,
                     split_dir=None if generated else root / str(data_cfg.split_dir))
    if cap:
        for key in ("train_sketch", "train_photo", "val_sketch", "val_photo", "zero_sketch", "zero_photo"):
            setattr(data, key, cap_per_class(getattr(data, key), int(cap), seed))
        if fine_grained:  # keep the sketches of the photos the cap kept, so that every sketch has its photo
            data.train_sketch = paired_subset(train_sketch, data.train_photo, int(cap), seed)
            data.zero_sketch = paired_subset(lists["zero_sketch"], data.zero_photo, int(cap), seed)
            data.val_sketch = paired_subset(val_sketch, data.train_photo, int(cap), seed)
    if pixels is not None:
        log.info("reading pre-resized images (%d px) from the image cache %s", pixels.size, pixels.folder)
    return data


def cap_per_class(filelist: FileList, cap: int, seed: int) -> FileList:
    """A seeded subset with at most `cap` items of each class (for debug runs)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(filelist.labels)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in np.unique(labels)]
    return _subset(filelist, np.concatenate(keep), filelist.source)


def _check_counts(name: str, root: Path, actual: dict[str, int], expected) -> None:
    if not expected:
        return
    wrong = {k: (int(v), actual[k]) for k, v in expected.items() if v is not None and k in actual and actual[k] != int(v)}
    if wrong:
        detail = ", ".join(f"{k}: expected {e}, found {a}" for k, (e, a) in wrong.items())
        raise DatasetError(
            f"dataset '{name}' at {root} has unexpected counts ({detail}); the download is incomplete or the "
            f"lists were edited. Re-run `python -m zsbir.data.prepare data={name} data.root={root}`"
        )


EXTRA_VIEWS = ("sketch_v2", "sketch_v3", "photo_pos_v2", "photo_v2", "photo_v3")  # augmented copies of a main view


def transforms_for(data_cfg, norm: str, train: bool) -> dict:
    """{domain: transform} for the main views, plus {view: transform} for the extra augmented
    views when `data.augment_views` gives them their own recipe (DSN: colour jitter and
    grayscale on the contrastive views only)."""
    size = int(data_cfg.image_size)
    augment = str(data_cfg.augment)
    uint8 = train and bool(data_cfg.get("gpu_augment"))  # the trainer augments and normalises on the device
    transforms = {d: build_transform(d, size, norm, augment, train=train, uint8=uint8) for d in ("sketch", "photo")}
    extra = data_cfg.get("augment_views")
    if train and extra and uint8:
        raise DatasetError("data.augment_views works with CPU-side augmentation only; set data.gpu_augment=false "
                           "or data.augment_views=null")
    if train and extra:
        transforms.update({view: build_transform(domain_of(view), size, norm, str(extra), train=True)
                           for view in EXTRA_VIEWS})
    return transforms


def _generator(seed: int) -> torch.Generator:
    # Loaders own a generator, so creating an iterator never draws from torch's global RNG
    # (which would make a resumed run diverge from an uninterrupted one).
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _in_memory(data_cfg) -> bool:
    return bool(data_cfg.get("keep_decoded_in_memory"))


def train_loader(data: SplitData, data_cfg, norm: str, views: tuple[str, ...], seed: int,
                 rank: int = 0, world_size: int = 1) -> DataLoader:
    if str(data_cfg.get("sampler") or "triplets") == "streams":
        return stream_loader(data, data_cfg, norm, views, seed, rank, world_size)
    sampler_name = str(data_cfg.get("sampler") or "triplets")
    if sampler_name == "instances" and not data_cfg.get("fine_grained"):
        raise DatasetError("data.sampler=instances needs sketch-photo pairs: use a fine-grained dataset "
                           "(data=sketchy_fg or data=synthetic_fg)")
    dataset_class = InstanceTripletDataset if sampler_name == "instances" else TripletDataset
    dataset = dataset_class(data.root, data.train_sketch, data.train_photo, transforms_for(data_cfg, norm, train=True),
                            views=views, seed=seed, keep_decoded_in_memory=_in_memory(data_cfg), pixels=data.pixels)
    balanced = data_cfg.get("balanced") or {}
    sampler = EpochBatchSampler(data.train_sketch.labels, int(data_cfg.batch_size), seed=seed, rank=rank,
                                world_size=world_size, classes_per_batch=balanced.get("classes_per_batch"),
                                items_per_class=balanced.get("items_per_class"))
    workers = int(data_cfg.num_workers)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, worker_init_fn=seed_worker,
                      generator=_generator(seed), pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def stream_loader(data: SplitData, data_cfg, norm: str, views: tuple[str, ...], seed: int,
                  rank: int = 0, world_size: int = 1) -> DataLoader:
    """Two-stream batches (zsbir/data/streams.py): `data.stream_batch.sketch` sketches + `.photo` photos."""
    if data_cfg.get("gpu_augment"):
        raise DatasetError("data.gpu_augment=true works with triplet batches only; set data.gpu_augment=false "
                           "or data.sampler=triplets")
    if data_cfg.get("balanced"):
        raise DatasetError("data.balanced (P x K batches) works with triplet batches only; set data.balanced=null "
                           "or data.sampler=triplets")
    sizes = data_cfg.get("stream_batch") or {}
    if not (sizes.get("sketch") and sizes.get("photo")):
        raise DatasetError("data.sampler=streams needs data.stream_batch.sketch and data.stream_batch.photo "
                           "(images of each domain per step), e.g. data.stream_batch={sketch:13,photo:26}")
    dataset = StreamDataset(data.root, data.train_sketch, data.train_photo, transforms_for(data_cfg, norm, train=True),
                            views=views, seed=seed, keep_decoded_in_memory=_in_memory(data_cfg), pixels=data.pixels)
    sampler = StreamBatchSampler(len(data.train_sketch), len(data.train_photo), int(sizes["sketch"]),
                                 int(sizes["photo"]), seed=seed, rank=rank, world_size=world_size)
    workers = int(data_cfg.num_workers)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_streams, num_workers=workers,
                      worker_init_fn=seed_worker, generator=_generator(seed), pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def eval_loader(data: SplitData, filelist: FileList, domain: str, data_cfg, norm: str) -> DataLoader:
    transform = build_transform(domain, int(data_cfg.image_size), norm, train=False)
    dataset = ImageListDataset(data.root, filelist, transform, keep_decoded_in_memory=_in_memory(data_cfg),
                               domain=domain, pixels=data.pixels)
    workers = int(data_cfg.num_workers)
    return DataLoader(dataset, batch_size=int(data_cfg.eval_batch_size), shuffle=False, num_workers=workers,
                      generator=_generator(0), pin_memory=torch.cuda.is_available(),
                      worker_init_fn=ignore_stop_signals if workers else None)
