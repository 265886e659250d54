"""Retrieval grids: a query sketch followed by its top-k photos, framed by correctness.

Like the qualitative tables of the ZS-SBIR papers: one PNG per query, the sketch first
(grey frame), then the k best-ranked gallery photos, each framed GREEN when it is of the
query's class and RED when not. Queries are a seeded sample, so the same run and settings
always show the same queries; rankings follow `ranked_gallery` (descending cosine, ties
by gallery index), the tie rule of the metrics.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from zsbir.data.filelist import FileList
from zsbir.data.pairs import load_image
from zsbir.data.transforms import WHITE, PadToSquare
from zsbir.eval.retrieval import Embeddings, ranked_gallery

GREEN = (0, 170, 0)
RED = (220, 0, 0)
QUERY_GREY = (128, 128, 128)
UNKNOWN_GREY = (200, 200, 200)  # a photo whose relevance is unknown (a user's sketch has no class)
BACKGROUND = (255, 255, 255)
CAPTION_HEIGHT = 16
GAP = 4  # pixels between tiles


def frame_width(tile: int) -> int:
    return max(2, tile // 24)


def tile_box(position: int, tile: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of tile `position` (0 = the query, 1..k = ranks 1..k), right/bottom exclusive."""
    left = position * (tile + GAP)
    return left, CAPTION_HEIGHT, left + tile, CAPTION_HEIGHT + tile


def sample_queries(n_queries: int, count: int, seed: int) -> np.ndarray:
    """A seeded sample of query indices, in list order."""
    count = min(int(count), n_queries)
    return np.sort(np.random.default_rng(seed).choice(n_queries, size=count, replace=False))


def write_retrieval_grids(embeddings: Embeddings, root: str | Path, query_list: FileList, gallery_list: FileList,
                          class_names: list[str], out_dir: str | Path, queries: int = 8, top_k: int = 10,
                          seed: int = 0, tile: int = 96) -> list[Path]:
    """Write one grid PNG per sampled query into `out_dir`; returns their paths (none when `queries` is 0).

    Earlier grids in `out_dir` are removed first, so the folder shows one evaluation only.
    """
    out_dir = Path(out_dir)
    for old in out_dir.glob("query*.png"):
        old.unlink()
    if int(queries) <= 0 or len(query_list) == 0 or len(gallery_list) == 0:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    picked = sample_queries(len(query_list), queries, seed)
    ranking = ranked_gallery(embeddings.queries[picked], embeddings.gallery, top_k)
    paths = []
    for query, ranked in zip(picked.tolist(), ranking.tolist()):
        label = int(embeddings.query_labels[query])
        relevant = [int(embeddings.gallery_labels[g]) == label for g in ranked]
        sketch = load_image(Path(root), query_list, query)
        photos = [load_image(Path(root), gallery_list, g) for g in ranked]
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        grid = draw_grid(sketch, photos, relevant, tile, caption=f"query {query}: {name}")
        path = out_dir / f"query{query:06d}_{_safe(name)}.png"
        grid.save(path)
        paths.append(path)
    return paths


def draw_grid(sketch: Image.Image, photos: list[Image.Image], relevant: list[bool | None], tile: int,
              caption: str = "") -> Image.Image:
    """The query sketch (grey frame) then the photos (green: query's class, red: other class,
    light grey: unknown)."""
    width = (1 + len(photos)) * (tile + GAP) - GAP
    canvas = Image.new("RGB", (width, CAPTION_HEIGHT + tile), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), caption, fill=(0, 0, 0))
    tiles = [(sketch, WHITE, QUERY_GREY)] + [(p, None, frame_colour(hit)) for p, hit in zip(photos, relevant)]
    border = frame_width(tile)
    for position, (image, pad_fill, colour) in enumerate(tiles):
        left, top, right, bottom = tile_box(position, tile)
        draw.rectangle((left, top, right - 1, bottom - 1), fill=colour)
        inner = tile - 2 * border
        # Sketches pad with white paper, photos with their mean colour (as the evaluation transform does).
        thumb = PadToSquare(pad_fill)(image.convert("RGB")).resize((inner, inner), Image.BILINEAR)
        canvas.paste(thumb, (left + border, top + border))
    return canvas


def frame_colour(relevant: bool | None) -> tuple[int, int, int]:
    return UNKNOWN_GREY if relevant is None else GREEN if relevant else RED


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "class"
