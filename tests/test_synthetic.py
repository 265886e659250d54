"""The built-in synthetic benchmark: real layout, deterministic from its seed."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from zsbir.data.filelist import read_class_file, read_filelist
from zsbir.data.synthetic import LISTS, SyntheticSpec, ensure_synthetic, expected_counts

SMALL = dict(seen_classes=5, unseen_classes=3, sketches_per_class=3, photos_per_class=3, val_sketches_per_class=1,
             image_size=32)


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_layout_matches_the_real_benchmarks(tmp_path):
    spec = SyntheticSpec(seed=1, **SMALL)
    root = ensure_synthetic(tmp_path, spec)
    split = root / "zeroshot"
    seen, unseen = read_class_file(split / "cname_cid.txt"), read_class_file(split / "cname_cid_zero.txt")
    assert len(seen) == 5 and len(unseen) == 3 and not set(seen) & set(unseen)
    counts = expected_counts(spec)
    for key, name in LISTS.items():
        filelist = read_filelist(split / name)
        assert len(filelist) == counts[key], key
        classes = unseen if key.startswith("zero") else seen
        for rel, label in zip(filelist.paths, filelist.labels):
            assert (root / rel).is_file()
            assert Path(rel).parts[1] == classes[label]  # <domain>/<class>/<file>
    sketch = np.asarray(Image.open(root / read_filelist(split / LISTS["train_sketch"]).paths[0]).convert("L"))
    photo = np.asarray(Image.open(root / read_filelist(split / LISTS["train_photo"]).paths[0]).convert("RGB"))
    assert sketch.shape == (32, 32) and photo.shape == (32, 32, 3)
    assert np.median(sketch) > 240 and sketch.min() < 120  # dark strokes on white paper
    assert photo.std(axis=(0, 1)).mean() > 20  # a coloured, textured photo


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a = ensure_synthetic(tmp_path / "a", SyntheticSpec(seed=7, **SMALL))
    b = ensure_synthetic(tmp_path / "b", SyntheticSpec(seed=7, **SMALL))
    c = ensure_synthetic(tmp_path / "c", SyntheticSpec(seed=8, **SMALL))
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)


def test_existing_benchmark_is_reused_not_regenerated(tmp_path):
    spec = SyntheticSpec(seed=3, **SMALL)
    root = ensure_synthetic(tmp_path, spec)
    marker = root / "zeroshot" / "cname_cid.txt"
    stamp = marker.stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, spec) == root
    assert marker.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folders left
