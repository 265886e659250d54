"""Binary codes for hashing results: ITQ (Gong & Lazebnik) and Hamming-ranked metrics.

ITQ centres the features, projects them on the top `bits` principal directions (V), and
alternates B = sign(V R) with the rotation R that minimises ||B - V R||_F. That R is the
orthogonal Procrustes solution: expanding the norm, only tr(R^T V^T B) depends on R; with
the SVD V^T B = U S W^T it is maximised by R = U W^T. (The DSN / SEM-PCYC code takes the
SVD of B^T V and uses U @ Vh of it, which is the transpose of this R, so their loss does
not decrease as ITQ intends.)

Which features to fit on is the caller's choice (normally the gallery or the training
features); `fit` never looks at labels.
"""
from __future__ import annotations

import torch

from zsbir.eval.metrics import retrieval_metrics


class ITQ:
    """Iterative quantisation to `bits`-bit codes in {-1, +1}.

    After `fit`, `loss_history[t]` is the quantisation loss ||B_t - V R_t||_F^2 of
    iteration t; it never increases (each step minimises it over B, then over R).
    """

    def __init__(self, bits: int = 64, iterations: int = 50, seed: int = 0):
        self.bits, self.iterations, self.seed = bits, iterations, seed
        self.mean: torch.Tensor | None = None
        self.projection: torch.Tensor | None = None  # (D x bits) principal directions
        self.rotation: torch.Tensor | None = None  # (bits x bits) orthogonal
        self.loss_history: list[float] = []

    def fit(self, features) -> "ITQ":
        x = _as_float64(features)
        if not 0 < self.bits <= min(x.shape):
            raise ValueError(f"bits={self.bits} must be in 1..min(n, d) = {min(x.shape)}")
        self.mean = x.mean(dim=0)
        self.projection = _principal_directions(x - self.mean, self.bits)
        v = (x - self.mean) @ self.projection
        rotation = _random_rotation(self.bits, self.seed)
        self.loss_history = []
        for _ in range(self.iterations):
            codes = _sign(v @ rotation)
            rotation = procrustes_rotation(v, codes)
            self.loss_history.append(float(torch.sum((codes - v @ rotation) ** 2)))
        self.rotation = rotation
        return self

    def encode(self, features) -> torch.Tensor:
        """(n x bits) int8 codes in {-1, +1}."""
        if self.rotation is None:
            raise RuntimeError("ITQ.encode called before fit")
        x = _as_float64(features)
        return _sign((x - self.mean) @ self.projection @ self.rotation).to(torch.int8)


def procrustes_rotation(v: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The orthogonal R minimising ||codes - v R||_F: R = U W^T for V^T B = U S W^T."""
    u, _, wh = torch.linalg.svd(v.T @ codes)
    return u @ wh


def hamming_retrieval_metrics(query_codes, query_labels, gallery_codes, gallery_labels, **kwargs) -> dict[str, float]:
    """`retrieval_metrics` ranked by Hamming distance of {-1, +1} codes, smallest first.

    For ±1 codes the dot product is bits - 2 * distance, so ranking by it is ranking by
    distance; its values are small integers, exact in float32, so equal distances are
    exact ties and go by gallery index (lower first), as in `retrieval_metrics`.
    Keyword arguments are passed on (protocol, map_at, prec_at, per_class, ...).
    """
    queries = torch.as_tensor(query_codes).to(torch.float32)
    gallery = torch.as_tensor(gallery_codes).to(torch.float32)
    return retrieval_metrics(queries, query_labels, gallery, gallery_labels, scores_fn=_code_agreement, **kwargs)


def _code_agreement(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    return queries @ gallery.T


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().cpu().to(torch.float64)


def _principal_directions(centred: torch.Tensor, bits: int) -> torch.Tensor:
    # eigh returns ascending eigenvalues; keep the `bits` largest.
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    return vectors[:, -bits:].flip(1)


def _random_rotation(size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    return q


def _sign(x: torch.Tensor) -> torch.Tensor:
    # torch.sign(0) is 0, which is not a code; send exact zeros to +1.
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
