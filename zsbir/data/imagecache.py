"""Pre-resized image cache: decode every image once, then load raw pixels by memory map.

Decoding JPEG/PNG at 224 px is the training bottleneck on a fast GPU (datasets.md), so
`python -m zsbir.data.prepare data=<name> cache=true` writes, per domain, one array
`<domain>.npy` of shape N x S x S x 3 (uint8) holding every image of the split's lists
after the deterministic transform prefix (RGB, padded to a square - white for sketches,
the photo's mean colour for photos - and resized to S; `transforms.square_resize_ops`).
`index.json` names the row of every relative path. With `data.preresized_folder=<folder>` the
loaders read rows from the memory map instead of decoding files; the remaining
transforms (resize to `data.image_size`, augmentation, normalisation) run on those pixels.

A run reads only the rows it needs and the OS page cache shares them between DataLoader
workers and runs. The index is written last (temporary file + rename), so an interrupted
build is never mistaken for a cache. The cache is keyed by relative path, so any subset of
a list (held-out validation, `max_per_class`, dropped files) maps onto it.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import transforms as T

from zsbir.data.filelist import DatasetError, FileList
from zsbir.data.transforms import square_resize_ops

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
INDEX = "index.json"


def _decode(args: tuple[str, str, int]) -> np.ndarray | None:
    path, domain, size = args
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(T.Compose(square_resize_ops(domain, size))(image), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # damaged files, decompression bombs
        return None


def decode_all(root: Path, paths: list[str], domain: str, size: int, workers: int, on_image=None) -> list[int]:
    """Decode `paths` in parallel (in order); call `on_image(i, pixels)`; return unreadable indices.

    Work goes out in blocks, so decoded images never pile up in memory faster than
    `on_image` stores them.
    """
    unreadable = []
    block = max(1, workers) * 256
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for start in range(0, len(paths), block):
            jobs = [(str(Path(root) / rel), domain, size) for rel in paths[start:start + block]]
            results = pool.map(_decode, jobs, chunksize=32) if pool else map(_decode, jobs)
            for i, pixels in enumerate(results, start):
                if pixels is None:
                    unreadable.append(i)
                elif on_image is not None:
                    on_image(i, pixels)
    finally:
        if pool:
            pool.shutdown()
    return unreadable


def build_image_cache(root: Path, lists: dict[str, tuple[FileList, str]], out_dir: Path, size: int,
                      workers: int = 1) -> dict[str, list[str]]:
    """Write the cache of every image of `lists` ({key: (file list, domain)}) into `out_dir`.

    Returns the unreadable relative paths per domain (their rows stay white and are not
    indexed, so a run that still lists them fails with a clear message or drops them).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX).unlink(missing_ok=True)  # the folder is not a valid cache until the new index exists
    by_domain: dict[str, list[str]] = {}
    for filelist, domain in lists.values():
        by_domain.setdefault(domain, []).extend(filelist.paths)
    index = {"format": CACHE_FORMAT, "size": size, "root": str(root), "domains": {}}
    unreadable_paths: dict[str, list[str]] = {}
    for domain, paths in by_domain.items():
        paths = list(dict.fromkeys(paths))  # unique, first-seen order
        pixels = np.lib.format.open_memmap(out_dir / f"{domain}.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(paths), size, size, 3))
        pixels[:] = 255

        def store(i: int, image: np.ndarray) -> None:
            pixels[i] = image

        log.info("caching %d %s images at %d px into %s", len(paths), domain, size, out_dir)
        bad = set(decode_all(root, paths, domain, size, workers, store))
        pixels.flush()
        del pixels
        unreadable_paths[domain] = [paths[i] for i in sorted(bad)]
        index["domains"][domain] = {"file": f"{domain}.npy",
                                    "rows": {p: i for i, p in enumerate(paths) if i not in bad}}
    tmp = out_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out_dir / INDEX)
    return unreadable_paths


class PreResizedImages:
    """Read-only view of a cache folder: `image(domain, relative path)` -> PIL image (S x S RGB).

    The memory maps open lazily in each process (a pickled memmap would copy its data
    into every DataLoader worker).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        index_path = self.folder / INDEX
        if not index_path.is_file():
            raise DatasetError(
                f"data.preresized_folder={self.folder} is not an image cache (no {INDEX}). Build it with "
                "`python -m zsbir.data.prepare data=<name> cache=true`, or set data.preresized_folder=null"
            )
        index = json.loads(index_path.read_text())
        if index.get("format") != CACHE_FORMAT:
            raise DatasetError(f"{index_path} has cache format {index.get('format')}, expected {CACHE_FORMAT}; "
                               "rebuild it with `python -m zsbir.data.prepare ... cache=true`")
        self.size = int(index["size"])
        self.rows = {d: info["rows"] for d, info in index["domains"].items()}
        self.files = {d: self.folder / info["file"] for d, info in index["domains"].items()}
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}

    def image(self, domain: str, rel_path: str) -> Image.Image:
        if domain not in self._arrays:
            self._arrays[domain] = np.load(self.files[domain], mmap_mode="r")
        return Image.fromarray(np.array(self._arrays[domain][self.rows[domain][rel_path]]))
