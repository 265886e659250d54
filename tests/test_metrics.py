"""Retrieval metrics: worked examples of docs/metrics.md and agreement with a plain
float64 per-query reference written here (stable argsort, explicit envelope loop)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zsbir.eval import metrics
from zsbir.eval.metrics import default_chunk_size, retrieval_metrics

# ----------------------------------------------------------------------------- reference


def reference_query(order_relevance: np.ndarray, protocol: str, map_at, prec_at) -> dict[str, float]:
    """Metrics of one query from its 0/1 relevance in ranked order (docs/metrics.md)."""
    n = len(order_relevance)
    n_relevant = int(order_relevance.sum())
    names = ["map_all"] + [f"map_{k}" for k in map_at] + [f"prec_{k}" for k in prec_at]
    if n_relevant == 0:
        return {name: math.nan for name in names}
    out = {"map_all": reference_ap(order_relevance, protocol, n_relevant)}
    for k in map_at:
        cut = min(k, n)
        out[f"map_{k}"] = reference_ap(order_relevance[:cut], protocol, min(cut, n_relevant))
    for k in prec_at:
        cut = min(k, n)
        out[f"prec_{k}"] = order_relevance[:cut].sum() / cut
    return out


def reference_ap(relevance: np.ndarray, protocol: str, voc_divisor: int) -> float:
    hits = np.cumsum(relevance)
    precision = hits / np.arange(1, len(relevance) + 1)
    if protocol == "voc":
        envelope = precision.copy()
        for j in range(len(envelope) - 2, -1, -1):
            envelope[j] = max(envelope[j], envelope[j + 1])
        return float(np.sum(envelope[relevance == 1]) / voc_divisor)
    n_inside = int(relevance.sum())
    return float(np.sum(precision[relevance == 1]) / n_inside) if n_inside else 0.0


def reference_metrics(scores, query_labels, gallery_labels, protocol, map_at, prec_at, per_class):
    """float64 metrics with the tie rule: equal scores ordered by gallery index."""
    rows = []
    for q in range(scores.shape[0]):
        order = np.argsort(-scores[q], kind="stable")
        relevance = (gallery_labels[order] == query_labels[q]).astype(np.int64)
        rows.append(reference_query(relevance, protocol, map_at, prec_at))
    names = list(rows[0])
    table = np.array([[row[n] for n in names] for row in rows], dtype=np.float64)
    if per_class:
        table = np.array([nanmean_columns(table[query_labels == c]) for c in np.unique(query_labels)])
    return dict(zip(names, nanmean_columns(table)))


def nanmean_columns(table: np.ndarray) -> np.ndarray:
    valid = ~np.isnan(table)
    counts = valid.sum(axis=0)
    sums = np.where(valid, table, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def cosine_float64(query_emb, gallery_emb) -> np.ndarray:
    q = np.asarray(query_emb, dtype=np.float64)
    g = np.asarray(gallery_emb, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    return q @ g.T


def assert_close(ours: dict, ref: dict, tol: float = 1e-6) -> None:
    for name, value in ref.items():
        if math.isnan(value):
            assert math.isnan(ours[name]), name
        else:
            assert ours[name] == pytest.approx(value, abs=tol), name


# ----------------------------------------------------------------------------- data


def ranking_case(relevance: list[int]):
    """One query and a gallery whose cosine ranking is exactly `relevance`, in order."""
    n = len(relevance)
    cosines = 1.0 - np.arange(n) / (n + 1)  # strictly decreasing with position
    gallery = np.stack([cosines, np.sqrt(1.0 - cosines**2)], axis=1)
    return np.array([[1.0, 0.0]]), np.array([1]), gallery, np.array(relevance)


def random_case(seed: int, n_queries=40, n_gallery=60, dim=8, n_classes=6):
    """Unnormalised embeddings with class structure and the awkward cases of the spec.

    Includes exact ties (gallery rows duplicated within and across classes), a class
    with a single gallery item, and a query class absent from the gallery (R = 0).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes + 1, dim))
    gallery_labels = rng.integers(0, n_classes - 1, n_gallery)
    gallery_labels[0] = n_classes - 1  # the single-item class
    query_labels = rng.integers(0, n_classes + 1, n_queries)  # class n_classes: no gallery item
    gallery = centres[gallery_labels] + 1.5 * rng.normal(size=(n_gallery, dim))
    queries = centres[query_labels] + 1.5 * rng.normal(size=(n_queries, dim))
    gallery *= rng.uniform(0.1, 10.0, size=(n_gallery, 1))  # unnormalised on purpose
    queries *= rng.uniform(0.1, 10.0, size=(n_queries, 1))
    for source, target in [(1, 7), (2, 9), (3, 30), (4, 41), (5, 50)]:
        gallery[target] = gallery[source]  # exact duplicates; labels may differ
    gallery_labels[9] = gallery_labels[2]  # one duplicate pair within a class
    gallery_labels[30] = (gallery_labels[3] + 1) % (n_classes - 1)  # and one across classes
    return queries, query_labels, gallery, gallery_labels


# ----------------------------------------------------------------------------- tests

WORKED_EXAMPLES = [
    # ranking, voc AP@all, plain AP@all, voc AP@4, plain AP@4 (docs/metrics.md)
    ([1, 0, 0, 1, 1, 0, 0, 0, 1], 0.661111, 0.636111, None, None),
    ([1, 0, 1, 0, 0, 1], 0.722222, 0.722222, 0.555556, 0.833333),
    ([0, 1, 1, 0, 1], 0.644444, 0.588889, None, None),
]


@pytest.mark.parametrize("ranking, voc_all, plain_all, voc_4, plain_4", WORKED_EXAMPLES)
def test_worked_examples(ranking, voc_all, plain_all, voc_4, plain_4):
    case = ranking_case(ranking)
    voc = retrieval_metrics(*case, protocol="voc", map_at=(4,), prec_at=(4,))
    plain = retrieval_metrics(*case, protocol="plain", map_at=(4,), prec_at=(4,))
    assert voc["map_all"] == pytest.approx(voc_all, abs=5e-7)
    assert plain["map_all"] == pytest.approx(plain_all, abs=5e-7)
    if voc_4 is not None:
        assert voc["map_4"] == pytest.approx(voc_4, abs=5e-7)
        assert plain["map_4"] == pytest.approx(plain_4, abs=5e-7)
    assert voc["prec_4"] == plain["prec_4"] == sum(ranking[:4]) / 4


def test_result_keys_and_counts():
    case = random_case(0)
    result = retrieval_metrics(*case, map_at=(5, 200), prec_at=(1, 100))
    assert set(result) == {"map_all", "map_5", "map_200", "prec_1", "prec_100", "n_queries", "n_gallery"}
    assert result["n_queries"] == 40 and result["n_gallery"] == 60
    assert all(isinstance(result[k], float) for k in ("map_all", "map_5", "prec_1"))


@pytest.mark.parametrize("protocol", ["voc", "plain"])
@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, None, 1000])
@pytest.mark.parametrize("as_torch", [False, True])
def test_matches_float64_reference(protocol, per_class, chunk_size, as_torch):
    queries, query_labels, gallery, gallery_labels = random_case(seed=1)
    map_at, prec_at = (1, 5, 200), (1, 10, 500)  # 200 and 500 exceed the gallery
    ref = reference_metrics(cosine_float64(queries, gallery), query_labels, gallery_labels,
                            protocol, map_at, prec_at, per_class)
    if as_torch:
        queries, gallery = torch.tensor(queries, dtype=torch.float32), torch.tensor(gallery, dtype=torch.float32)
        query_labels, gallery_labels = torch.tensor(query_labels), torch.tensor(gallery_labels)
    ours = retrieval_metrics(queries, query_labels, gallery, gallery_labels, protocol=protocol,
                             map_at=map_at, prec_at=prec_at, per_class=per_class, chunk_size=chunk_size)
    assert_close(ours, ref)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_matches_reference_on_larger_random_problems(seed):
    case = random_case(seed, n_queries=120, n_gallery=700, dim=16, n_classes=12)
    for protocol in ("voc", "plain"):
        ref = reference_metrics(cosine_float64(case[0], case[2]), case[1], case[3], protocol,
                                (50, 200), (100, 200), per_class=False)
        assert_close(retrieval_metrics(*case, protocol=protocol, map_at=(50, 200)), ref)


@pytest.mark.parametrize("dtype, exact_path", [(np.float32, "_ranks_by_keys"),
                                                (np.float64, "_ranks_by_stable_sort")])
def test_mixed_ties_take_the_exact_path_and_follow_gallery_index(monkeypatch, dtype, exact_path):
    """Massive ties between relevant and irrelevant items: order by gallery index."""
    rng = np.random.default_rng(5)
    levels = rng.integers(-3, 4, size=(30, 4)).astype(dtype)  # few distinct scores
    gallery, gallery_labels = levels[rng.integers(0, 30, 200)], rng.integers(0, 5, 200)
    queries, query_labels = levels[rng.integers(0, 30, 25)], rng.integers(0, 5, 25)
    calls = []
    exact = getattr(metrics, exact_path)
    monkeypatch.setattr(metrics, exact_path, lambda *a: calls.append(1) or exact(*a))

    def dot(q, g):  # integer scores: exact in float32 and float64 alike
        return q @ g.T

    for protocol in ("voc", "plain"):
        ours = retrieval_metrics(queries, query_labels, gallery, gallery_labels, protocol=protocol,
                                 map_at=(10, 200), prec_at=(10, 50), scores_fn=dot, chunk_size=7)
        ref = reference_metrics(queries.astype(np.float64) @ gallery.T.astype(np.float64), query_labels,
                                gallery_labels, protocol, (10, 200), (10, 50), per_class=False)
        assert_close(ours, ref)
    assert calls, f"the tie-exact path {exact_path} was never exercised"


def test_tie_rule_lower_gallery_index_ranks_first():
    # Two identical photos, the irrelevant one first in the gallery: it must rank first.
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    result = retrieval_metrics(np.array([[1.0, 0.0]]), [1], gallery, [0, 1, 1], protocol="plain",
                               map_at=(1,), prec_at=(1,))
    assert result["prec_1"] == 0.0
    assert result["map_all"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    swapped = retrieval_metrics(np.array([[1.0, 0.0]]), [1], gallery, [1, 0, 1], protocol="plain",
                                map_at=(1,), prec_at=(1,))
    assert swapped["prec_1"] == 1.0


def test_scores_sign_does_not_matter():
    """The torchmetrics trap: scores <= 0 must not be treated as non-relevant."""
    case = random_case(6)
    shifted = retrieval_metrics(*case, protocol="plain",
                                scores_fn=lambda q, g: torch.nn.functional.normalize(q, dim=1)
                                @ torch.nn.functional.normalize(g, dim=1).T - 1.0)
    assert_close(shifted, retrieval_metrics(*case, protocol="plain"))


def test_queries_without_relevant_items_are_skipped():
    gallery = np.eye(3)
    only_missing = retrieval_metrics(np.eye(3)[:1], [9], gallery, [0, 1, 2])
    assert all(math.isnan(only_missing[k]) for k in ("map_all", "map_200", "prec_100"))
    mixed = retrieval_metrics(np.eye(3)[:2], [9, 1], gallery, [0, 1, 2], prec_at=(1,))
    assert mixed["map_all"] == 1.0 and mixed["prec_1"] == 1.0


def test_per_class_weights_classes_equally():
    # Class 0 has three perfect queries, class 1 one query with AP 1/2.
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    queries = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [1.0, 0.0]])
    labels = [0, 0, 0, 1]
    assert retrieval_metrics(queries, labels, gallery, [0, 1])["map_all"] == pytest.approx(3.5 / 4)
    assert retrieval_metrics(queries, labels, gallery, [0, 1], per_class=True)["map_all"] == pytest.approx(0.75)


def test_rejects_unknown_protocol_and_length_mismatch():
    with pytest.raises(ValueError, match="protocol"):
        retrieval_metrics(np.eye(2), [0, 1], np.eye(2), [0, 1], protocol="map")
    with pytest.raises(ValueError, match="length"):
        retrieval_metrics(np.eye(2), [0], np.eye(2), [0, 1])


def test_default_chunk_size_bounds_memory():
    assert default_chunk_size(54151) * 54151 * 16 <= metrics.DEFAULT_CHUNK_BUDGET_BYTES
    assert default_chunk_size(10**9) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    case = random_case(7, n_queries=200, n_gallery=900, dim=16)
    tensors = [torch.as_tensor(x) for x in case]
    cpu = retrieval_metrics(*tensors, map_at=(5, 200))
    cuda = retrieval_metrics(*tensors, map_at=(5, 200), device="cuda")
    assert_close(cuda, cpu)
