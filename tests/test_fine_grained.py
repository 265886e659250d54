"""Fine-grained ZS-SBIR (issue 17): instance_accuracy against a float64 brute-force reference,
the Sketchy instance pairing on a tree built from the real lists, the FG loss terms against
hand-computed values, the patch shuffle, and the synthetic_fg path end to end."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zsbir.eval.metrics import instance_accuracy

# ----------------------------------------------------------------------------- instance_accuracy


def reference_accuracy(queries, q_inst, gallery, g_inst, q_group=None, g_group=None, ks=(1, 5)) -> dict:
    """Per query: sort the allowed gallery items by (-cosine, gallery index) in float64 and find the match."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    ranks = []
    for i in range(len(q)):
        scores = g @ q[i]
        allowed = [j for j in range(len(g)) if q_group is None or g_group[j] == q_group[i]]
        ranked = sorted(allowed, key=lambda j: (-scores[j], j))
        ranks.append(1 + [g_inst[j] for j in ranked].index(q_inst[i]))
    return {f"acc_{k}": float(np.mean(np.asarray(ranks) <= k)) for k in ks}


def tied_case(seed: int, n_gallery: int = 40, n_queries: int = 60, groups: int = 4):
    """Random instance-retrieval data with many exact ties: embeddings repeat a few random vectors
    (equal vectors score exactly equal; distinct ones are far apart even in float32)."""
    rng = np.random.default_rng(seed)
    palette = rng.normal(size=(6, 5))
    gallery = palette[rng.integers(0, len(palette), n_gallery)]
    queries = palette[rng.integers(0, len(palette), n_queries)]
    g_inst = rng.permutation(1000)[:n_gallery]  # arbitrary, unordered ids
    g_group = rng.integers(0, groups, n_gallery)
    match = rng.integers(0, n_gallery, n_queries)
    return queries, g_inst[match], gallery, g_inst, g_group[match], g_group


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("grouped", [False, True])
def test_instance_accuracy_matches_bruteforce_reference_with_ties(seed, grouped):
    queries, q_inst, gallery, g_inst, q_group, g_group = tied_case(seed)
    groups = (q_group, g_group) if grouped else (None, None)
    expected = reference_accuracy(queries, q_inst, gallery, g_inst, *groups, ks=(1, 3, 5))
    for dtype in (np.float64, np.float32):
        got = instance_accuracy(queries.astype(dtype), q_inst, gallery.astype(dtype), g_inst, *groups,
                                ks=(1, 3, 5), chunk_size=7)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (key, dtype)
        assert got["n_queries"] == len(queries) and got["n_gallery"] == len(gallery)


def test_instance_accuracy_ties_go_to_the_lower_gallery_index():
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    queries = np.array([[1.0, 0.0], [1.0, 0.0]])
    # query 0's match is item 0 (wins the tie: rank 1); query 1's is item 1 (loses it: rank 2)
    got = instance_accuracy(queries, [10, 11], gallery, [10, 11, 12], ks=(1, 2))
    assert got["acc_1"] == 0.5 and got["acc_2"] == 1.0


def test_instance_accuracy_groups_restrict_the_competitors():
    gallery = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    queries = np.array([[0.95, 0.05]])  # closest: item 0, then item 1 (its match)
    ungrouped = instance_accuracy(queries, [1], gallery, [0, 1, 2], ks=(1,))
    grouped = instance_accuracy(queries, [1], gallery, [0, 1, 2], [7], [3, 7, 7], ks=(1,))
    assert ungrouped["acc_1"] == 0.0 and grouped["acc_1"] == 1.0


@pytest.mark.parametrize("problem, args, message", [
    ("missing", ([5], [0, 1]), "no true match"),
    ("repeated", ([0], [0, 0]), "more than once"),
])
def test_instance_accuracy_rejects_bad_instances(problem, args, message):
    q_inst, g_inst = args
    with pytest.raises(ValueError, match=message):
        instance_accuracy(np.ones((1, 2)), q_inst, np.eye(2), g_inst)


def test_instance_accuracy_rejects_a_match_in_another_group():
    with pytest.raises(ValueError, match="another group"):
        instance_accuracy(np.ones((1, 2)), [1], np.eye(2), [0, 1], [0], [0, 1])
