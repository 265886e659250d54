"""ITQ hashing and Hamming-ranked retrieval metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zsbir.eval.hashing import ITQ, hamming_retrieval_metrics, procrustes_rotation


def structured_features(seed: int, n=600, dim=48, n_classes=8):
    """Class centres in a low-dimensional subspace plus noise: PCA has something to find."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(12, dim))
    centres = rng.normal(size=(n_classes, 12)) @ basis
    labels = rng.integers(0, n_classes, n)
    return centres[labels] + 0.5 * rng.normal(size=(n, dim)), labels


def test_quantisation_loss_never_increases():
    features, _ = structured_features(0)
    itq = ITQ(bits=16, iterations=50).fit(features)
    losses = np.array(itq.loss_history)
    assert len(losses) == 50
    assert np.all(np.diff(losses) <= 1e-9 * losses[:-1])
    assert losses[-1] < losses[0]  # the rotation actually learns something


def test_codes_are_plus_minus_one_with_requested_bits():
    features, _ = structured_features(1)
    itq = ITQ(bits=32).fit(features)
    codes = itq.encode(features[:100])
    assert codes.shape == (100, 32) and codes.dtype == torch.int8
    assert set(codes.unique().tolist()) == {-1, 1}


def test_rotation_stays_orthogonal():
    features, _ = structured_features(2)
    rotation = ITQ(bits=24).fit(features).rotation
    assert torch.allclose(rotation @ rotation.T, torch.eye(24, dtype=torch.float64), atol=1e-10)


def test_procrustes_update_is_the_minimiser():
    """The correct R beats random rotations and the DSN/SEM-PCYC transposed update."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(300, 10, generator=gen, dtype=torch.float64)
    codes = torch.sign(torch.randn(300, 10, generator=gen, dtype=torch.float64))
    best = procrustes_rotation(v, codes)

    def loss(rotation):
        return float(torch.sum((codes - v @ rotation) ** 2))

    assert loss(best) < loss(best.T)
    for _ in range(50):
        q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
        assert loss(best) <= loss(q) + 1e-9


def test_bits_must_fit_the_data_and_encode_needs_fit():
    features, _ = structured_features(4, n=20, dim=8)
    with pytest.raises(ValueError, match="bits"):
        ITQ(bits=64).fit(features)
    with pytest.raises(RuntimeError, match="before fit"):
        ITQ(bits=4).encode(features)


def hamming_reference(query_codes, query_labels, gallery_codes, gallery_labels, top_k):
    """float64 voc mAP@all and P@K by Hamming distance, ties by gallery index (stable)."""
    aps, precisions = [], []
    for code, label in zip(query_codes, query_labels):
        distance = np.sum(code[None, :] != gallery_codes, axis=1)
        relevance = (gallery_labels[np.argsort(distance, kind="stable")] == label).astype(np.float64)
        if relevance.sum() == 0:
            continue
        precision = np.cumsum(relevance) / np.arange(1, len(relevance) + 1)
        for j in range(len(precision) - 2, -1, -1):
            precision[j] = max(precision[j], precision[j + 1])
        aps.append(np.sum(precision[relevance == 1]) / relevance.sum())
        precisions.append(relevance[:top_k].sum() / top_k)
    return float(np.mean(aps)), float(np.mean(precisions))


@pytest.mark.parametrize("bits", [8, 16])
def test_hamming_metrics_match_reference_with_tie_rule(bits):
    features, labels = structured_features(5, n=500)
    gallery, gallery_labels = features[:400], labels[:400]
    queries, query_labels = features[400:], labels[400:]
    itq = ITQ(bits=bits).fit(gallery)
    gallery_codes, query_codes = itq.encode(gallery), itq.encode(queries)
    result = hamming_retrieval_metrics(query_codes, query_labels, gallery_codes, gallery_labels,
                                       map_at=(), prec_at=(50,), chunk_size=16)
    ref_map, ref_prec = hamming_reference(query_codes.numpy(), query_labels, gallery_codes.numpy(),
                                          gallery_labels, 50)
    assert result["map_all"] == pytest.approx(ref_map, abs=1e-6)
    assert result["prec_50"] == pytest.approx(ref_prec, abs=1e-6)
    assert not math.isnan(result["map_all"])
