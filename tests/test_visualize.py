"""Retrieval grids: files, seeded query sample, and frame colours of a known ranking."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from zsbir.data.filelist import FileList
from zsbir.eval.retrieval import Embeddings, ranked_gallery
from zsbir.eval.visualize import GREEN, QUERY_GREY, RED, frame_width, sample_queries, tile_box, write_retrieval_grids

TILE = 40


def unit(angle_deg: float) -> list[float]:
    return [math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))]


@pytest.fixture
def known_ranking(tmp_path):
    """Two queries at 0 and 180 degrees; gallery items at chosen angles, so the order is known.

    Query 0 (class 0) at 0 deg ranks by |angle|: items 3 (0 deg), 1 (10), 4 (10, ties with 1:
    lower index first), 0 (30), 2 (60), 5 (120). Query 1 (class 1) at 180 deg ranks the reverse.
    """
    angles = [30, 10, 60, 0, 10, 120]
    gallery_labels = [0, 1, 0, 0, 1, 1]
    for i in range(len(angles)):
        Image.new("RGB", (20, 30), (40 * i, 90, 200)).save(tmp_path / f"photo{i}.png")
    for i in range(2):
        Image.new("L", (25, 25), 255).save(tmp_path / f"sketch{i}.png")
    embeddings = Embeddings(torch.tensor([unit(0), unit(180)]), torch.tensor([0, 1]),
                            torch.tensor([unit(a) for a in angles]), torch.tensor(gallery_labels))
    queries = FileList([f"sketch{i}.png" for i in range(2)], [0, 1], "sketches")
    gallery = FileList([f"photo{i}.png" for i in range(len(angles))], gallery_labels, "photos")
    return embeddings, queries, gallery, tmp_path


def test_ranking_breaks_exact_ties_by_gallery_index(known_ranking):
    embeddings = known_ranking[0]
    order = ranked_gallery(embeddings.queries, embeddings.gallery, top_k=10)
    assert order.tolist() == [[3, 1, 4, 0, 2, 5], [5, 2, 0, 1, 4, 3]]


def frame_colour(image: Image.Image, position: int) -> tuple[int, int, int]:
    left, top, _, _ = tile_box(position, TILE)
    inset = frame_width(TILE) // 2
    return image.getpixel((left + inset, top + inset))


def test_frames_are_green_for_the_query_class_and_red_otherwise(known_ranking):
    embeddings, queries, gallery, root = known_ranking
    paths = write_retrieval_grids(embeddings, root, queries, gallery, ["cat", "dog"], root / "grids",
                                  queries=2, top_k=4, seed=0, tile=TILE)
    assert [p.name for p in paths] == ["query000000_cat.png", "query000001_dog.png"]
    expected_top4 = {0: [3, 1, 4, 0], 1: [5, 2, 0, 1]}
    gallery_labels = gallery.labels
    for query, path in enumerate(paths):
        image = Image.open(path).convert("RGB")
        assert image.size == (5 * TILE + 4 * 4, 16 + TILE)
        assert frame_colour(image, 0) == QUERY_GREY
        colours = [frame_colour(image, rank) for rank in range(1, 5)]
        assert colours == [GREEN if gallery_labels[g] == query else RED for g in expected_top4[query]]
        # Inside the frame is the photo itself (its blue channel), not the frame colour.
        left, top, right, bottom = tile_box(1, TILE)
        assert image.getpixel(((left + right) // 2, (top + bottom) // 2))[2] == 200


def test_query_sample_is_seeded_and_grids_can_be_switched_off(known_ranking):
    embeddings, queries, gallery, root = known_ranking
    assert sample_queries(100, 8, seed=3).tolist() == sample_queries(100, 8, seed=3).tolist()
    assert sample_queries(100, 8, seed=3).tolist() != sample_queries(100, 8, seed=4).tolist()
    assert sample_queries(5, 8, seed=0).tolist() == [0, 1, 2, 3, 4]
    first = write_retrieval_grids(embeddings, root, queries, gallery, ["cat", "dog"], root / "grids", queries=2, tile=TILE)
    # A later evaluation replaces the folder's grids; queries=0 writes none and leaves none behind.
    again = write_retrieval_grids(embeddings, root, queries, gallery, ["cat", "dog"], root / "grids", queries=1, tile=TILE)
    assert len(first) == 2 and len(again) == 1 and sorted((root / "grids").glob("*.png")) == again
    assert write_retrieval_grids(embeddings, root, queries, gallery, ["cat", "dog"], root / "grids", queries=0) == []
    assert list((root / "grids").glob("*.png")) == []
