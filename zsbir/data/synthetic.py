"""A procedurally generated ZS-SBIR benchmark that needs no download.

Every category is a random glyph: a closed smooth outline plus a few open strokes. A
*sketch* of a category draws the glyph with thin dark strokes and hand-drawn jitter on
white paper; a *photo* draws the same glyph filled and thick, in a random colour, over a
textured and cluttered background, with its own pose and scale. Seen and unseen
categories come from the same generator, so a model that learns to match shapes across
the two domains generalises to the unseen ones - which is exactly what ZS-SBIR measures.

The benchmark is written once to a cache folder in the SAME layout as the real
benchmarks (docs: ../shared/docs/datasets.md): `cname_cid.txt`, `cname_cid_zero.txt`
and `<relative path> <label>` file lists, so one file-list loader reads it and the real
datasets alike. It is a pure function of its parameters (the folder name is a hash of
them) and is written atomically (temporary folder + rename).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPLIT_DIR = "zeroshot"
LISTS = {
    "train_sketch": "sketch_filelist_train.txt",
    "train_photo": "photo_filelist_train.txt",
    "val_sketch": "sketch_filelist_test.txt",
    "zero_sketch": "sketch_filelist_zero.txt",
    "zero_photo": "photo_filelist_zero.txt",
}


@dataclass(frozen=True)
class SyntheticSpec:
    seed: int = 0
    seen_classes: int = 60
    unseen_classes: int = 15
    sketches_per_class: int = 24  # train sketches per seen class / zero-shot sketches per unseen class
    photos_per_class: int = 24
    val_sketches_per_class: int = 6  # held-out sketches of seen classes, for model selection
    image_size: int = 64

    def digest(self) -> str:
        payload = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- glyphs
def _smooth_closed(points: np.ndarray, samples: int = 64) -> np.ndarray:
    """Closed Catmull-Rom curve through `points` (k x 2)."""
    k = len(points)
    out = []
    for i in range(k):
        p0, p1, p2, p3 = (points[(i + d) % k] for d in (-1, 0, 1, 2))
        for t in np.linspace(0, 1, samples // k, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(
                0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t3)
            )
    return np.asarray(out + [out[0]])


def _smooth_open(points: np.ndarray, samples: int = 24) -> np.ndarray:
    """Open quadratic Bezier-like stroke through 3 control points."""
    p0, p1, p2 = points
    t = np.linspace(0, 1, samples)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def make_glyph(rng: np.random.Generator) -> dict:
    """A category: a closed body outline and 1-3 open strokes, in [-1, 1]^2 coordinates."""
    k = int(rng.integers(4, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radii = rng.uniform(0.35, 0.95, k)
    body = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    body *= rng.uniform(0.6, 1.0, 2)  # anisotropic: long/flat bodies
    strokes = []
    for _ in range(int(rng.integers(1, 4))):
        start = body[int(rng.integers(k))] * rng.uniform(0.3, 1.0)
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction) + 1e-9
        length = rng.uniform(0.4, 0.9)
        mid = start + direction * length / 2 + rng.normal(scale=0.25, size=2)
        end = start + direction * length
        strokes.append(np.stack([start, mid, end]))
    return {"body": body, "strokes": strokes}


def _pose(rng: np.random.Generator, scale_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    angle = np.deg2rad(rng.uniform(-25, 25))
    scale = rng.uniform(*scale_range)
    flip = -1.0 if rng.random() < 0.5 else 1.0  # mirror images are the same category
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    rot = rot @ np.diag([flip, 1.0])
    shift = rng.uniform(-0.12, 0.12, 2)
    return rot, shift


def _to_pixels(points: np.ndarray, rot: np.ndarray, shift: np.ndarray, size: int) -> list[tuple[float, float]]:
    xy = points @ rot.T + shift
    xy = (xy * 0.45 + 0.5) * size
    return [tuple(p) for p in xy]


# ----------------------------------------------------------------------------- rendering
SUPERSAMPLE = 3


def render_sketch(glyph: dict, rng: np.random.Generator, size: int) -> Image.Image:
    """Thin dark strokes with hand-drawn jitter on white paper."""
    big = size * SUPERSAMPLE
    img = Image.new("L", (big, big), 255)
    draw = ImageDraw.Draw(img)
    rot, shift = _pose(rng, (0.75, 1.05))
    width = max(1, round(big / 48 * rng.uniform(0.8, 1.4)))
    ink = int(rng.integers(0, 70))
    body = glyph["body"] + rng.normal(scale=0.05, size=glyph["body"].shape)
    curve = _smooth_closed(body)
    curve += rng.normal(scale=0.008, size=curve.shape)  # wobbly hand
    draw.line(_to_pixels(curve, rot, shift, big), fill=ink, width=width, joint="curve")
    for stroke in glyph["strokes"]:
        if rng.random() < 0.1:  # people forget parts
            continue
        pts = _smooth_open(stroke + rng.normal(scale=0.05, size=stroke.shape))
        pts += rng.normal(scale=0.008, size=pts.shape)
        draw.line(_to_pixels(pts, rot, shift, big), fill=ink, width=width, joint="curve")
    img = img.resize((size, size), Image.LANCZOS)
    return img.convert("RGB")


def _background(rng: np.random.Generator, big: int) -> Image.Image:
    """Smooth colour gradient + grain + clutter: nothing in it depends on the category."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, big)[:, None, None]
    axis = rng.random() < 0.5
    grad = c0 * (1 - t) + c1 * t
    grad = np.broadcast_to(grad, (big, big, 3)) if axis else np.broadcast_to(grad.transpose(1, 0, 2), (big, big, 3))
    grain = rng.normal(scale=rng.uniform(5, 25), size=(big // 4, big // 4, 3))
    grain = np.kron(grain, np.ones((4, 4, 1)))[:big, :big]
    img = Image.fromarray(np.clip(grad + grain, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        color = tuple(int(c) for c in rng.uniform(0, 255, 3))
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * big
        w, h = rng.uniform(0.05, 0.35, 2) * big
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=color)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=color)
        else:
            draw.line([(x0, y0), (x0 + w * 2, y0 + h * 2)], fill=color, width=int(big / 30))
    return img.filter(ImageFilter.GaussianBlur(radius=big / 200))


def render_photo(glyph: dict, rng: np.random.Generator, size: int) -> Image.Image:
    """The glyph filled and thick, in colour, over a textured, cluttered background."""
    big = size * SUPERSAMPLE
    img = _background(rng, big)
    draw = ImageDraw.Draw(img)
    rot, shift = _pose(rng, (0.7, 1.1))
    fill = rng.uniform(0, 255, 3)
    edge = np.clip(fill * rng.uniform(0.2, 0.6), 0, 255)
    fill_c, edge_c = tuple(int(c) for c in fill), tuple(int(c) for c in edge)
    body = glyph["body"] + rng.normal(scale=0.02, size=glyph["body"].shape)
    outline = _to_pixels(_smooth_closed(body), rot, shift, big)
    draw.polygon(outline, fill=fill_c)
    draw.line(outline, fill=edge_c, width=max(2, round(big / 22)), joint="curve")
    for stroke in glyph["strokes"]:
        pts = _smooth_open(stroke + rng.normal(scale=0.02, size=stroke.shape))
        draw.line(_to_pixels(pts, rot, shift, big), fill=edge_c, width=max(2, round(big / 14)), joint="curve")
    img = img.resize((size, size), Image.LANCZOS)
    return img


# ----------------------------------------------------------------------------- writing
def _class_names(count: int, prefix: str) -> list[str]:
    return [f"{prefix}_{i:03d}" for i in range(count)]


def _write_split(root: Path, spec: SyntheticSpec) -> None:
    master = np.random.default_rng(spec.seed)
    glyph_seeds = master.integers(0, 2**63 - 1, spec.seen_classes + spec.unseen_classes)
    seen = _class_names(spec.seen_classes, "shape")
    unseen = _class_names(spec.unseen_classes, "novel")
    split = root / SPLIT_DIR
    split.mkdir(parents=True)
    (split / "cname_cid.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(seen)))
    (split / "cname_cid_zero.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(unseen)))
    lists: dict[str, list[str]] = {key: [] for key in LISTS}

    def emit(key: str, domain: str, cname: str, label: int, index: int, image: Image.Image) -> None:
        rel = Path(domain) / cname / f"{domain}_{index:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel)
        lists[key].append(f"{rel.as_posix()} {label}\n")

    for cid, (cname, gseed) in enumerate(zip(seen + unseen, glyph_seeds)):
        rng = np.random.default_rng(int(gseed))
        glyph = make_glyph(rng)
        is_seen = cid < spec.seen_classes
        label = cid if is_seen else cid - spec.seen_classes
        n_sketch = spec.sketches_per_class + (spec.val_sketches_per_class if is_seen else 0)
        for i in range(n_sketch):
            key = ("train_sketch" if i < spec.sketches_per_class else "val_sketch") if is_seen else "zero_sketch"
            emit(key, "sketch", cname, label, i, render_sketch(glyph, rng, spec.image_size))
        for i in range(spec.photos_per_class):
            emit("train_photo" if is_seen else "zero_photo", "photo", cname, label, i, render_photo(glyph, rng, spec.image_size))
    for key, name in LISTS.items():
        (split / name).write_text("".join(lists[key]))
    (root / "spec.json").write_text(json.dumps({"version": GENERATOR_VERSION, **asdict(spec)}, indent=2))


def ensure_synthetic(cache_dir: str | os.PathLike, spec: SyntheticSpec) -> Path:
    """Generate the benchmark under `cache_dir` unless it already exists; return its root."""
    root = Path(cache_dir).expanduser() / f"synthetic-{spec.digest()}"
    if (root / "spec.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info("generating the synthetic benchmark (%s) into %s", spec, root)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root.parent))
    try:
        _write_split(tmp, spec)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first: keep its copy
            if not (root / "spec.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def expected_counts(spec: SyntheticSpec) -> dict[str, int]:
    return {
        "seen_classes": spec.seen_classes,
        "unseen_classes": spec.unseen_classes,
        "train_sketch": spec.seen_classes * spec.sketches_per_class,
        "train_photo": spec.seen_classes * spec.photos_per_class,
        "val_sketch": spec.seen_classes * spec.val_sketches_per_class,
        "zero_sketch": spec.unseen_classes * spec.sketches_per_class,
        "zero_photo": spec.unseen_classes * spec.photos_per_class,
    }
