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
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from zsbir.choices import SyntheticSpec

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
SPLIT_DIR = "zeroshot"
LISTS = {
    "train_sketch": "sketch_filelist_train.txt",
    "train_photo": "photo_filelist_train.txt",
    "val_sketch": "sketch_filelist_test.txt",
    "zero_sketch": "sketch_filelist_zero.txt",
    "zero_photo": "photo_filelist_zero.txt",
}


def spec_digest(spec: SyntheticSpec) -> str:
    """Short hash of the spec and the generator version: the benchmark's cache folder name."""
    payload = json.dumps({"version": GENERATOR_VERSION, **asdict(spec)}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- glyphs
# A category is a composition: a body shape (with its own aspect ratio) and one or two
# parts attached at fixed places on the body. Unseen categories are new compositions of
# the same primitives, as real unseen categories share parts with seen ones.
BODIES = ("ellipse", "triangle", "square", "pentagon", "hexagon", "star", "diamond")
PARTS = ("antenna", "ball", "fork", "zigzag", "hook")
ANCHORS = {"top": np.pi / 2, "bottom": -np.pi / 2, "left": np.pi, "right": 0.0}


def _regular(n: int, phase: float, points_per_edge: int = 6) -> np.ndarray:
    corners = [(np.cos(phase + 2 * np.pi * i / n), np.sin(phase + 2 * np.pi * i / n)) for i in range(n + 1)]
    edges = [np.linspace(corners[i], corners[i + 1], points_per_edge, endpoint=False) for i in range(n)]
    return np.concatenate(edges + [np.asarray(corners[:1])])


def body_outline(kind: str, aspect: float) -> np.ndarray:
    """Closed outline (k x 2) of a body, radius ~0.55, stretched horizontally by `aspect`."""
    if kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 49)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "star":
        radii = np.where(np.arange(11) % 2 == 0, 1.0, 0.45)
        t = np.pi / 2 + np.pi * np.arange(11) / 5
        corners = np.stack([radii * np.cos(t), radii * np.sin(t)], 1)
        pts = np.concatenate([np.linspace(corners[i], corners[i + 1], 4, endpoint=False) for i in range(10)] + [corners[:1]])
    else:
        n, phase = {"triangle": (3, np.pi / 2), "square": (4, np.pi / 4), "pentagon": (5, np.pi / 2),
                    "hexagon": (6, 0.0), "diamond": (4, 0.0)}[kind]
        pts = _regular(n, phase)
        if kind == "diamond":
            pts = pts * np.array([0.6, 1.0])
    return pts * 0.55 * np.array([aspect, 1.0])


def part_strokes(kind: str, anchor: str, body: np.ndarray) -> tuple[list[np.ndarray], list[tuple[np.ndarray, float]]]:
    """Polylines (and filled dots) of a part attached where `anchor` points out of the body."""
    angle = ANCHORS[anchor]
    out = np.array([np.cos(angle), np.sin(angle)])
    side = np.array([-out[1], out[0]])
    base = body[np.argmax(body @ out)]  # the body's extreme point in that direction
    tip = base + out * 0.4
    dots: list[tuple[np.ndarray, float]] = []
    if kind == "antenna":
        strokes = [np.stack([base, tip])]
    elif kind == "ball":
        strokes = [np.stack([base, tip])]
        dots = [(tip + out * 0.08, 0.09)]
    elif kind == "fork":
        mid = base + out * 0.22
        strokes = [np.stack([base, mid]), np.stack([mid, mid + (out + side) * 0.18]), np.stack([mid, mid + (out - side) * 0.18])]
    elif kind == "zigzag":
        t = np.linspace(0, 1, 7)[:, None]
        wiggle = np.where(np.arange(7) % 2 == 0, -1.0, 1.0)[:, None] * 0.07
        wiggle[0] = wiggle[-1] = 0
        strokes = [base + out * 0.45 * t + side * wiggle]
    else:  # hook: out, then curling sideways
        t = np.linspace(0, np.pi, 12)[:, None]
        centre = base + out * 0.3 + side * 0.1
        arc = centre + (out * np.sin(t) - side * np.cos(t)) * 0.1
        strokes = [np.concatenate([np.stack([base, base + out * 0.3 + side * 0.0]), arc])]
    return strokes, dots


def make_glyph(rng: np.random.Generator, used: set) -> dict:
    """A new category: a body and one or two parts at distinct anchors, never seen before."""
    while True:
        body = BODIES[int(rng.integers(len(BODIES)))]
        n_parts = int(rng.integers(1, 3))
        anchors = rng.choice(list(ANCHORS), size=n_parts, replace=False)
        parts = tuple(sorted((PARTS[int(rng.integers(len(PARTS)))], str(a)) for a in anchors))
        key = (body, parts)
        if key not in used:
            used.add(key)
            break
    outline = body_outline(body, aspect=float(rng.uniform(0.75, 1.3)))
    strokes, dots = [], []
    for kind, anchor in parts:
        s, d = part_strokes(kind, anchor, outline)
        strokes += s
        dots += d
    return {"body": outline, "strokes": strokes, "dots": dots, "name": body + "".join(f"-{k}@{a}" for k, a in parts)}


# ----------------------------------------------------------------------------- rendering
SUPERSAMPLE = 3


def _pose(rng: np.random.Generator, scale_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    # No mirroring: a part on the left and one on the right make different categories.
    angle = np.deg2rad(rng.uniform(-20, 20))
    scale = rng.uniform(*scale_range)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    shift = rng.uniform(-0.12, 0.12, 2)
    return rot, shift


def _to_pixels(points: np.ndarray, rot: np.ndarray, shift: np.ndarray, size: int) -> list[tuple[float, float]]:
    xy = points @ rot.T + shift
    xy = (xy * np.array([0.5, -0.5]) + 0.5) * size  # y up in glyph space, down in pixels
    return [tuple(p) for p in xy]


def _dot_box(centre: np.ndarray, radius: float, rot: np.ndarray, shift: np.ndarray, size: int) -> list[float]:
    (x, y), = _to_pixels(centre[None], rot, shift, size)
    r = radius * 0.5 * size * float(np.sqrt(abs(np.linalg.det(rot))))
    return [x - r, y - r, x + r, y + r]


def render_sketch(glyph: dict, rng: np.random.Generator, size: int, pose: tuple | None = None) -> Image.Image:
    """Thin dark strokes with hand-drawn jitter on white paper; `pose` (rotation-scale, shift): its own when None."""
    big = size * SUPERSAMPLE
    img = Image.new("L", (big, big), 255)
    draw = ImageDraw.Draw(img)
    rot, shift = pose if pose is not None else _pose(rng, (0.8, 1.05))
    width = max(1, round(big / 40 * rng.uniform(0.8, 1.3)))
    ink = int(rng.integers(0, 70))

    def wobble(points: np.ndarray) -> np.ndarray:
        return points + rng.normal(scale=0.015, size=points.shape)  # a wobbly hand

    draw.line(_to_pixels(wobble(glyph["body"] * rng.uniform(0.92, 1.08, 2)), rot, shift, big), fill=ink, width=width,
              joint="curve")
    for stroke in glyph["strokes"]:
        draw.line(_to_pixels(wobble(stroke), rot, shift, big), fill=ink, width=width, joint="curve")
    for centre, radius in glyph["dots"]:
        draw.ellipse(_dot_box(centre, radius, rot, shift, big), outline=ink, width=width)
    img = img.resize((size, size), Image.LANCZOS)
    return img.convert("RGB")


def _background(rng: np.random.Generator, big: int) -> Image.Image:
    """Smooth colour gradient + grain + clutter (lines, small blobs): nothing depends on the category."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, big)[:, None, None]
    grad = np.broadcast_to(c0 * (1 - t) + c1 * t, (big, big, 3))
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    grain = rng.normal(scale=rng.uniform(5, 25), size=(big // 4, big // 4, 3))
    grain = np.kron(grain, np.ones((4, 4, 1)))[:big, :big]
    img = Image.fromarray(np.clip(grad + grain, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        color = tuple(int(c) for c in rng.uniform(0, 255, 3))
        x0, y0 = rng.uniform(0, 1.0, 2) * big
        if rng.random() < 0.5:
            r = rng.uniform(0.02, 0.06) * big
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=color)
        else:
            dx, dy = rng.uniform(-0.4, 0.4, 2) * big
            draw.line([(x0, y0), (x0 + dx, y0 + dy)], fill=color, width=max(1, int(big / 60)))
    return img.filter(ImageFilter.GaussianBlur(radius=big / 200))


def render_photo(glyph: dict, rng: np.random.Generator, size: int, pose: tuple | None = None) -> Image.Image:
    """The glyph filled and thick, in colour, over a textured, cluttered background; `pose` as render_sketch."""
    big = size * SUPERSAMPLE
    img = _background(rng, big)
    draw = ImageDraw.Draw(img)
    rot, shift = pose if pose is not None else _pose(rng, (0.75, 1.1))
    fill = rng.uniform(0, 255, 3)
    edge = np.clip(fill * rng.uniform(0.15, 0.5), 0, 255)
    fill_c, edge_c = tuple(int(c) for c in fill), tuple(int(c) for c in edge)
    outline = _to_pixels(glyph["body"] * rng.uniform(0.95, 1.05, 2), rot, shift, big)
    draw.polygon(outline, fill=fill_c)
    draw.line(outline, fill=edge_c, width=max(2, round(big / 24)), joint="curve")
    for stroke in glyph["strokes"]:
        draw.line(_to_pixels(stroke, rot, shift, big), fill=edge_c, width=max(2, round(big / 16)), joint="curve")
    for centre, radius in glyph["dots"]:
        draw.ellipse(_dot_box(centre, radius, rot, shift, big), fill=fill_c, outline=edge_c, width=max(2, round(big / 24)))
    return img.resize((size, size), Image.LANCZOS)


# ----------------------------------------------------------------------------- writing
def _class_names(count: int, prefix: str) -> list[str]:
    return [f"{prefix}_{i:03d}" for i in range(count)]


def categories(root: Path, spec) -> list[tuple[str, dict, np.random.Generator, bool, int]]:
    """Draw the glyph categories of `spec` (seed, seen_classes, unseen_classes) and write the
    class files; per category (name, glyph, its image generator, is seen, label)."""
    master = np.random.default_rng(spec.seed)
    used: set = set()
    glyphs = [make_glyph(master, used) for _ in range(spec.seen_classes + spec.unseen_classes)]
    image_seeds = master.integers(0, 2**63 - 1, len(glyphs))
    seen = _class_names(spec.seen_classes, "shape")
    unseen = _class_names(spec.unseen_classes, "novel")
    split = root / SPLIT_DIR
    split.mkdir(parents=True)
    (split / "cname_cid.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(seen)))
    (split / "cname_cid_zero.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(unseen)))
    return [(cname, glyph, np.random.default_rng(int(image_seed)), cid < spec.seen_classes,
             cid if cid < spec.seen_classes else cid - spec.seen_classes)
            for cid, (cname, glyph, image_seed) in enumerate(zip(seen + unseen, glyphs, image_seeds))]


def _write_split(root: Path, spec: SyntheticSpec) -> None:
    drawn = categories(root, spec)
    split = root / SPLIT_DIR
    lists: dict[str, list[str]] = {key: [] for key in LISTS}

    def emit(key: str, domain: str, cname: str, label: int, index: int, image: Image.Image) -> None:
        rel = Path(domain) / cname / f"{domain}_{index:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel)
        lists[key].append(f"{rel.as_posix()} {label}\n")

    for cname, glyph, rng, is_seen, label in drawn:
        n_sketch = spec.sketches_per_class + (spec.val_sketches_per_class if is_seen else 0)
        for i in range(n_sketch):
            key = ("train_sketch" if i < spec.sketches_per_class else "val_sketch") if is_seen else "zero_sketch"
            emit(key, "sketch", cname, label, i, render_sketch(glyph, rng, spec.image_size))
        for i in range(spec.photos_per_class):
            emit("train_photo" if is_seen else "zero_photo", "photo", cname, label, i, render_photo(glyph, rng, spec.image_size))
    for key, name in LISTS.items():
        (split / name).write_text("".join(lists[key]))
    (root / "spec.json").write_text(json.dumps({"version": GENERATOR_VERSION, **asdict(spec)}, indent=2))


def ensure_synthetic(cache_dir: str | os.PathLike, spec, writer=None, prefix: str = "synthetic") -> Path:
    """Generate the benchmark under `cache_dir` unless it already exists; return its root.

    `writer(folder, spec)` writes it (default: this module's category-level benchmark);
    `prefix` names its kind in the folder name (data=synthetic_fg: `synthetic_fg-<hash>`).
    """
    writer = writer or _write_split
    root = Path(cache_dir).expanduser() / f"{prefix}-{spec_digest(spec)}"
    if (root / "spec.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info("generating the synthetic benchmark (%s) into %s", spec, root)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root.parent))
    try:
        writer(tmp, spec)
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
