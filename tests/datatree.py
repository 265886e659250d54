"""Tiny benchmark trees for tests, sampled from the real split files.

`build_tree` copies the class files, writes every public list reduced to a few lines per
class (in the original order, plus the second copy of any photo the real list names
twice: Sketchy's duplicates), generates a small image for every kept line, and fills the
seen-class folders of train lists that are not public (TU-Berlin photos, QuickDraw).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# dataset config -> (folder under the data dir, split dir, {list key: list file}, {list key: image folder})
DATASETS = {
    "sketchy": ("Sketchy", "zeroshot1", {
        "train_sketch": "sketch_tx_000000000000_ready_filelist_train.txt",
        "train_photo": "all_photo_filelist_train.txt",
        "val_sketch": "sketch_tx_000000000000_ready_filelist_test.txt",
        "zero_sketch": "sketch_tx_000000000000_ready_filelist_zero.txt",
        "zero_photo": "all_photo_filelist_zero.txt"}, {}),
    "sketchy_split2": ("Sketchy", "zeroshot0", {
        "train_sketch": "sketch_tx_000000000000_ready_filelist_train.txt",
        "train_photo": "all_photo_filelist_train.txt",
        "zero_sketch": "sketch_tx_000000000000_ready_filelist_zero.txt",
        "zero_photo": "all_photo_filelist_zero.txt"}, {}),
    "tuberlin": ("TUBerlin", "zeroshot", {
        "train_sketch": "png_ready_filelist_train.txt",
        "val_sketch": "png_ready_filelist_test.txt",
        "zero_sketch": "png_ready_filelist_zero.txt",
        "zero_photo": "ImageResized_ready_filelist_zero.txt"}, {"train_photo": "ImageResized_ready"}),
    "quickdraw": ("QuickDraw", "zeroshot", {
        "zero_sketch": "sketch_zero.txt",
        "zero_photo": "all_photo_zero.txt"}, {"train_sketch": "sketches", "train_photo": "images"}),
}
BUILT_EXTENSIONS = ("jpg", "JPEG", "png")  # one file of each per class folder: all must be picked up


def split_line(line: str) -> tuple[str, int]:
    path, label = line.rstrip("\n").rsplit(maxsplit=1)
    return path, int(label)


def sample_lines(lines: list[str], per_class: int) -> list[str]:
    """The first `per_class` lines of every class, plus any other line naming the same photo."""
    parsed = [split_line(line) for line in lines if line.strip()]
    taken: dict[int, int] = defaultdict(int)
    keep = set()
    for i, (_, label) in enumerate(parsed):
        if taken[label] < per_class:
            taken[label] += 1
            keep.add(i)
    twins = defaultdict(list)  # (class folder, file name) -> line indices
    for i, (path, _) in enumerate(parsed):
        twins[tuple(path.split("/")[-2:])].append(i)
    for i in list(keep):
        keep.update(twins[tuple(parsed[i][0].split("/")[-2:])])
    return [f"{parsed[i][0]} {parsed[i][1]}\n" for i in sorted(keep)]


def write_image(path: Path, domain: str, seed: int) -> None:
    """A small non-square image: dark strokes on white (sketch) or a coloured scene (photo)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = 20, 14
    if domain == "sketch":
        image = Image.new("L", (w, h), 255)
        ImageDraw.Draw(image).line([tuple(rng.integers(0, 14, 2)) for _ in range(3)], fill=0, width=2)
    else:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    image.save(path)


def domain_of(rel_path: str) -> str:
    return "sketch" if any(part in rel_path for part in ("sketch", "png_ready")) else "photo"


def build_tree(shared_splits: Path, data_dir: Path, dataset: str, per_class: int = 2) -> Path:
    """Write the tiny tree of `dataset` under `data_dir`; returns the dataset root."""
    folder, split_dir, lists, folders = DATASETS[dataset]
    source = shared_splits / folder / split_dir
    root = data_dir / folder
    split = root / split_dir
    split.mkdir(parents=True, exist_ok=True)
    for name in ("cname_cid.txt", "cname_cid_zero.txt"):
        (split / name).write_text((source / name).read_text())
    images: set[str] = set()
    for list_name in lists.values():
        lines = sample_lines((source / list_name).read_text().splitlines(keepends=True), per_class)
        (split / list_name).write_text("".join(lines))
        images.update(split_line(line)[0] for line in lines)
    seen = [line.rsplit(maxsplit=1)[0] for line in (source / "cname_cid.txt").read_text().splitlines() if line.strip()]
    for key, image_folder in folders.items():
        for name in seen:
            images.update(f"{image_folder}/{name}/built_{i}.{ext}"
                          for i, ext in enumerate(BUILT_EXTENSIONS))
    for i, rel in enumerate(sorted(images)):
        write_image(root / rel, domain_of(rel), seed=i)
    return root
