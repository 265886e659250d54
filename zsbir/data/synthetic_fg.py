"""The generated fine-grained benchmark (`data=synthetic_fg`): every photo is its own instance.

Categories are the glyphs of zsbir/data/synthetic.py. An *instance* of a category is the
glyph under its own shape variant (aspect, shear and bend of the whole figure), its own pose
and its own colours and background. Each sketch of an instance is drawn from that instance
as a person would copy it: the same variant and nearly the same pose (a few degrees and
pixels off), with hand-drawn jitter. Telling instances apart therefore needs the shape and
pose details that category-level training ignores, as on Sketchy.

Files follow Sketchy's names, so one pairing rule (zsbir/data/instances.py) reads both:
`photo/<class>/<class>_0003.png` and its sketches `sketch/<class>/<class>_0003-1.png`, ...
Seen and unseen categories split as in data=synthetic; every seen-class photo also gets
`val_sketches_per_photo` held-out sketches for model selection.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from zsbir.choices import SyntheticFgSpec
from zsbir.data.synthetic import (GENERATOR_VERSION, LISTS, SPLIT_DIR, categories, ensure_synthetic, render_photo,
                                  render_sketch)


def _affine(points: np.ndarray, matrix: np.ndarray, bend: float) -> np.ndarray:
    """The instance's shape variant: a linear map, then a bend that shifts x with height."""
    out = points @ matrix.T
    return out + np.stack([bend * np.sin(np.pi * out[:, 1]), np.zeros(len(out))], 1)


def instance_variant(glyph: dict, rng: np.random.Generator) -> dict:
    """The category's glyph as one instance draws it (aspect, shear, bend)."""
    aspect = rng.uniform(0.7, 1.35)
    shear = rng.uniform(-0.35, 0.35)
    matrix = np.array([[aspect, shear], [0.0, 1.0]]) / np.sqrt(aspect)
    bend = rng.uniform(-0.12, 0.12)
    return {"body": _affine(glyph["body"], matrix, bend),
            "strokes": [_affine(s, matrix, bend) for s in glyph["strokes"]],
            "dots": [(_affine(c[None], matrix, bend)[0], r) for c, r in glyph["dots"]],
            "name": glyph["name"]}


def _rotation(angle: float, scale: float) -> np.ndarray:
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale


def instance_pose(rng: np.random.Generator) -> tuple[float, float, np.ndarray]:
    """(angle, scale, shift) of one instance's photo."""
    return np.deg2rad(rng.uniform(-30, 30)), rng.uniform(0.75, 1.05), rng.uniform(-0.12, 0.12, 2)


def sketch_pose(pose: tuple[float, float, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the instance's pose as a hand draws it: a few degrees, a few percent, a few pixels off."""
    angle, scale, shift = pose
    return (_rotation(angle + np.deg2rad(rng.normal(scale=3.0)), scale * rng.uniform(0.95, 1.05)),
            shift + rng.normal(scale=0.02, size=2))


def write_fine_grained(root: Path, spec: SyntheticFgSpec) -> None:
    drawn = categories(root, spec)  # the glyph categories of data=synthetic, and the class files
    split = root / SPLIT_DIR
    lists: dict[str, list[str]] = {key: [] for key in LISTS}

    def emit(key: str, rel: str, label: int, image) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel)
        lists[key].append(f"{rel} {label}\n")

    for cname, glyph, rng, is_seen, label in drawn:
        n_val = spec.val_sketches_per_photo if is_seen else 0
        for i in range(spec.photos_per_class):
            variant, pose = instance_variant(glyph, rng), instance_pose(rng)
            stem = f"{cname}_{i:04d}"
            photo = render_photo(variant, rng, spec.image_size, pose=(_rotation(pose[0], pose[1]), pose[2]))
            emit("train_photo" if is_seen else "zero_photo", f"photo/{cname}/{stem}.png", label, photo)
            for j in range(1, spec.sketches_per_photo + n_val + 1):
                key = ("train_sketch" if j <= spec.sketches_per_photo else "val_sketch") if is_seen else "zero_sketch"
                sketch = render_sketch(variant, rng, spec.image_size, pose=sketch_pose(pose, rng))
                emit(key, f"sketch/{cname}/{stem}-{j}.png", label, sketch)
    for key, name in LISTS.items():
        (split / name).write_text("".join(lists[key]))
    (root / "spec.json").write_text(json.dumps({"version": GENERATOR_VERSION, "kind": "fine_grained",
                                                **asdict(spec)}, indent=2))


def ensure_synthetic_fg(cache_dir: str | os.PathLike, spec: SyntheticFgSpec) -> Path:
    """Generate the fine-grained benchmark under `cache_dir` unless it exists; return its root."""
    return ensure_synthetic(cache_dir, spec, writer=write_fine_grained, prefix="synthetic_fg")


def expected_counts(spec: SyntheticFgSpec) -> dict[str, int]:
    per_seen, per_unseen = spec.seen_classes * spec.photos_per_class, spec.unseen_classes * spec.photos_per_class
    return {"seen_classes": spec.seen_classes, "unseen_classes": spec.unseen_classes,
            "train_photo": per_seen, "train_sketch": per_seen * spec.sketches_per_photo,
            "val_sketch": per_seen * spec.val_sketches_per_photo,
            "zero_photo": per_unseen, "zero_sketch": per_unseen * spec.sketches_per_photo}
