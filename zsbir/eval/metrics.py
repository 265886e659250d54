"""Retrieval metrics of ZS-SBIR (mAP@all, mAP@K, P@K) computed exactly and fast.

Definitions: docs/metrics.md, protocols ``voc`` and ``plain``.

How it is computed
------------------
Every metric of one query is a function of the ranks ``r_1 < ... < r_R`` of its R
relevant gallery items only:
``prec_i = i / r_i``; the VOC envelope at a relevant position is the suffix max of
those precisions (precision only rises at hits, so the max over all later positions
is reached at a relevant one); AP@K, P@K look at the relevant items with ``r_i <= K'``.

So the engine never builds a ranked list of the gallery. Queries are grouped by class
and processed in chunks of at most ``chunk_size`` rows; for one chunk it

1. scores the chunk against the whole gallery (the only query x gallery matrix alive),
2. sorts each score row (values only: a plain float sort, the cheapest full sort) and
   the scores of the class's relevant items,
3. finds the rank of every relevant item with two binary searches
   (rank = 1 + number of items that outrank it),
4. computes all requested metrics from those ranks in one float64 pass.

Ties: an exact tie is broken by gallery index, the lower index ranks first (a stable
sort of the gallery). Ties among relevant items alone do not change any metric, so
the binary searches handle them; a row where a relevant item ties with an irrelevant
one is re-ranked exactly: float32 scores with a sort of 64-bit keys (score bits,
gallery index), other dtypes with a stable sort in gallery order. Such rows are not
rare: 28k float32 cosines in a row hold a few exactly equal pairs (birthday paradox),
and binary codes tie massively.

Scores are ranked in float64 when the embeddings are float64 (NumPy's default), else
in float32 (the papers' features); float32 rankings can differ from float64 ones where
two scores are closer than float32 resolution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zsbir.choices import metric_names
from zsbir.errors import ZsbirError

PROTOCOLS = ("voc", "plain")
# Memory the score chunk and its sorting buffers may take; sets the default chunk size.
DEFAULT_CHUNK_BUDGET_BYTES = 256 * 2**20
# Bytes per query x gallery pair in one chunk: float32 scores plus int64 sort keys
# (tie re-ranking) plus slack for the binary-search outputs.
_BYTES_PER_PAIR = 16

ScoresFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Degenerate embeddings (docs/metrics.md "Ties"): total variance of the unit vectors below
# this, or more than this share of a query's scores tied with another item, is reported.
DEGENERATE_VARIANCE = 1e-6
DEGENERATE_TIED_SHARE = 0.5
_TIE_SAMPLE_QUERIES = 64


class NonFiniteEmbeddingsError(ZsbirError):
    """Embeddings with NaN or Inf values: no metric can be computed from them."""


def check_finite(embeddings, what: str) -> None:
    """Raise NonFiniteEmbeddingsError naming `what` and how many rows hold NaN or Inf.

    A NaN score compares false with everything, so a ranking would put NaN items anywhere,
    typically first: all-NaN embeddings would score mAP@all = 1.0.
    """
    embeddings = torch.as_tensor(embeddings)
    if embeddings.numel() == 0 or not embeddings.is_floating_point():
        return
    bad = int((~torch.isfinite(embeddings.reshape(len(embeddings), -1))).any(dim=1).sum())
    if bad:
        raise NonFiniteEmbeddingsError(
            f"{bad} of {len(embeddings)} {what} embeddings hold NaN or Inf values (the model has diverged); no "
            "metric is computed from them. Lower optim.lr, enable trainer.grad_clip, or evaluate an earlier checkpoint"
        )


def degenerate_embeddings(queries, gallery) -> list[str]:
    """Warnings when the embeddings carry (almost) no information (empty list: none).

    Collapsed embeddings score well above chance because of the tie rule (ties ranked by
    gallery index, docs/metrics.md), so such a number must not pass as a result.
    """
    unit = F.normalize(torch.cat([_as_float_tensor(queries), _as_float_tensor(gallery)]).double(), dim=1)
    warnings = []
    variance = float(unit.var(dim=0, unbiased=False).sum()) if len(unit) > 1 else 0.0
    if variance < DEGENERATE_VARIANCE:
        warnings.append(f"degenerate embeddings: total variance {variance:.3g} of the L2-normalised embeddings "
                        f"(< {DEGENERATE_VARIANCE:g}): every item looks the same")
    n_queries = len(queries)
    rows = unit[: min(n_queries, _TIE_SAMPLE_QUERIES)] @ unit[n_queries:].T
    if rows.numel():
        scores = rows.float()  # ties as the float32 ranking sees them
        ordered = scores.sort(dim=1).values
        tied = torch.zeros_like(ordered, dtype=torch.bool)
        equal = ordered[:, 1:] == ordered[:, :-1]
        tied[:, 1:] |= equal
        tied[:, :-1] |= equal
        share = float(tied.double().mean())
        if share > DEGENERATE_TIED_SHARE:
            warnings.append(f"degenerate embeddings: {share:.0%} of the query-gallery scores are tied with another "
                            "item's, so the ranking is mostly the gallery order (tie rule, docs/metrics.md); "
                            "the metrics do not measure retrieval")
    return warnings


def retrieval_metrics(
    query_emb,
    query_labels,
    gallery_emb,
    gallery_labels,
    protocol: str = "voc",
    map_at: Sequence[int] = (200,),
    prec_at: Sequence[int] = (100, 200),
    per_class: bool = False,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    scores_fn: ScoresFn | None = None,
) -> dict[str, float]:
    """Score sketch queries against a photo gallery with the metrics of docs/metrics.md.

    Args:
        query_emb, gallery_emb: (n_queries x d) and (n_gallery x d) embeddings, torch
            tensors or NumPy arrays. They are L2-normalised here (similarity = cosine).
        query_labels, gallery_labels: integer class labels; relevant = same label.
        protocol: "voc" (SAKE/DSN/SEM-PCYC family) or "plain" (torchmetrics family).
        map_at: cut-offs K for mAP@K; prec_at: cut-offs K for P@K. K larger than the
            gallery is truncated to the gallery size (K' = min(K, N)).
        per_class: average each metric over the queries of each class first, then over
            classes (DSN); default averages over queries.
        chunk_size: queries scored at once; default fits DEFAULT_CHUNK_BUDGET_BYTES.
        device: where scores are computed; default the device of `query_emb` if it is a
            tensor, else the CPU.
        scores_fn: optional `scores_fn(query_chunk, gallery) -> (m x N)` similarity
            (higher = more similar). When given, the embeddings are passed to it as they
            are (not normalised); used for Hamming ranking of binary codes.

    Returns:
        ``map_all``, ``map_<K>`` per K in map_at, ``prec_<K>`` per K in prec_at (floats),
        plus ``n_queries``, ``n_gallery`` (ints).

    Ranking is deterministic: items with exactly equal scores are ordered by gallery
    index, the lower index first. A query whose class has no gallery item (R = 0)
    yields NaN for every metric and is left out of the means (nanmean).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    device = torch.device(device) if device is not None else _default_device(query_emb)
    queries, gallery = _as_float_tensor(query_emb), _as_float_tensor(gallery_emb).to(device)
    gallery = gallery.to(torch.promote_types(queries.dtype, gallery.dtype))
    queries = queries.to(gallery.dtype)
    check_finite(queries, "query")
    check_finite(gallery, "gallery")
    query_classes, gallery_classes, n_classes = _class_ids(query_labels, gallery_labels)
    if queries.shape[0] != query_classes.numel() or gallery.shape[0] != gallery_classes.numel():
        raise ValueError("embeddings and labels disagree in length")
    if scores_fn is None:
        queries, gallery = F.normalize(queries, dim=1), F.normalize(gallery, dim=1)
        scores_fn = _cosine_scores

    n_gallery = gallery.shape[0]
    chunk_size = chunk_size or default_chunk_size(n_gallery)
    names = metric_names(map_at, prec_at)
    layout = _GalleryLayout.build(gallery, gallery_classes, n_classes)
    per_query = torch.full((queries.shape[0], len(names)), float("nan"), dtype=torch.float64)

    for cls, query_idx in _queries_by_class(query_classes, n_classes):
        start, end = layout.block(cls)
        if end == start:
            continue  # no relevant item: the query's metrics stay NaN
        for chunk_idx in query_idx.split(chunk_size):
            chunk = queries[chunk_idx].to(device)
            ranks = _relevant_ranks(chunk, layout, start, end, scores_fn)
            per_query[chunk_idx] = _metrics_from_ranks(ranks, n_gallery, protocol, map_at, prec_at).cpu()

    result = _average(per_query, query_classes, per_class, names)
    result["n_queries"] = int(queries.shape[0])
    result["n_gallery"] = int(n_gallery)
    return result


def default_chunk_size(n_gallery: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Largest number of queries whose chunk buffers fit `budget_bytes`."""
    return max(1, budget_bytes // (_BYTES_PER_PAIR * max(1, n_gallery)))


# ----------------------------------------------------------------------------- inputs

def _default_device(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _as_float_tensor(x) -> torch.Tensor:
    x = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _class_ids(query_labels, gallery_labels) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Map arbitrary integer labels to 0..C-1 over the union of both label sets."""
    q, g = _labels_tensor(query_labels), _labels_tensor(gallery_labels)
    classes, ids = torch.unique(torch.cat([q, g]), return_inverse=True)
    return ids[: q.numel()], ids[q.numel():], int(classes.numel())


def _labels_tensor(labels) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().reshape(-1).long()
    return torch.from_numpy(np.asarray(labels).reshape(-1).astype(np.int64))


def _cosine_scores(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    return queries @ gallery.T


@dataclass
class _GalleryLayout:
    """The gallery reordered so that each class is one contiguous block of columns.

    Scores of a class's relevant items are then a slice, not a gather. The original
    index of each column is kept for the tie rule.
    """

    embeddings: torch.Tensor  # (N x d), columns grouped by class
    original_index: torch.Tensor  # (N,) int64, gallery index of each column
    starts: torch.Tensor  # (C + 1,) block boundaries
    classes: torch.Tensor  # (N,) class of each gallery item, original order

    @classmethod
    def build(cls, gallery: torch.Tensor, gallery_classes: torch.Tensor, n_classes: int):
        order = torch.sort(gallery_classes, stable=True).indices
        counts = torch.bincount(gallery_classes, minlength=n_classes)
        starts = torch.zeros(n_classes + 1, dtype=torch.long)
        starts[1:] = torch.cumsum(counts, 0)
        order = order.to(gallery.device)
        return cls(gallery[order], order, starts, gallery_classes.to(gallery.device))

    def block(self, cls: int) -> tuple[int, int]:
        return int(self.starts[cls]), int(self.starts[cls + 1])


def _queries_by_class(query_classes: torch.Tensor, n_classes: int):
    order = torch.sort(query_classes, stable=True).indices
    counts = torch.bincount(query_classes, minlength=n_classes).tolist()
    for cls, query_idx in enumerate(order.split(counts)):
        if query_idx.numel():
            yield cls, query_idx


# ----------------------------------------------------------------------------- ranking

def _relevant_ranks(chunk, layout: _GalleryLayout, start: int, end: int, scores_fn) -> torch.Tensor:
    """1-based ranks (m x R, ascending per row) of the relevant items [start, end)."""
    scores = _ranking_scores(scores_fn(chunk, layout.embeddings))
    relevant = _sort_rows(scores[:, start:end].clone())
    # Sort a copy: rows with mixed ties are re-ranked from the very same unsorted scores.
    ranks, mixed_ties = _ranks_by_search(_sort_rows(scores.clone()), relevant)
    if mixed_ties.any():
        rows = mixed_ties.nonzero().squeeze(1)
        if scores.dtype == torch.float32:
            ranks[rows] = _ranks_by_keys(scores[rows], layout.original_index, start, end)
        else:
            ranks[rows] = _ranks_by_stable_sort(scores[rows], layout, start)
    return ranks


def _ranking_scores(scores: torch.Tensor) -> torch.Tensor:
    # `+ 0.0` turns -0.0 into +0.0: equal as floats but not as bit patterns (tie keys).
    if scores.dtype != torch.float64:
        scores = scores.to(torch.float32)
    return scores.add_(0.0).contiguous()


def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Ascending sort of each row, values only, in place on the CPU."""
    if x.device.type == "cpu":
        # NumPy's SIMD sort is several times faster than torch's CPU sort for this.
        x.numpy().sort(axis=1)
        return x
    return torch.sort(x, dim=1).values


def _ranks_by_search(everything: torch.Tensor, relevant: torch.Tensor):
    """Relevant ranks from sorted score rows; flags rows that need exact tie ranking.

    Both inputs ascending. For the relevant item at ascending position k:
    items strictly above = N - (#items <= s); if every item tied with it is relevant,
    the tied block occupies consecutive ranks, and which relevant item takes which of
    them does not change any metric. Then rank = N - right_all + right_rel - k.
    A relevant item tied with an irrelevant one (a "mixed" tie) needs the gallery
    indices to be ordered; its row is flagged.
    """
    n_gallery, n_relevant = everything.shape[1], relevant.shape[1]
    right_all = torch.searchsorted(everything, relevant, right=True)
    right_rel = torch.searchsorted(relevant, relevant, right=True)
    left_rel = torch.searchsorted(relevant, relevant, right=False)
    # The copies of s in `everything` end at right_all; one more copy just before the
    # relevant ones is an irrelevant item tied with s (a gather, not another search).
    before_copies = right_all - (right_rel - left_rel) - 1
    mixed_ties = ((before_copies >= 0)
                  & (everything.gather(1, before_copies.clamp(min=0)) == relevant)).any(dim=1)
    k = torch.arange(n_relevant, device=relevant.device)
    ranks = n_gallery - right_all + right_rel - k
    return ranks.flip(1), mixed_ties


def _ranks_by_keys(scores, original_index, start: int, end: int) -> torch.Tensor:
    """Exact ranks with the tie rule: sort unique int64 keys (score, gallery index).

    key = (descending-order int of the float32 score) * 2**32 + 2 * index + relevant.
    Indexes are unique, so the relevance bit never decides the order; it is read back
    after the sort to find where the relevant items landed.
    """
    low_bits = original_index * 2
    low_bits[start:end] += 1
    keys = _sort_rows(_descending_score_keys(scores).mul_(2**32).bitwise_or_(low_bits))
    positions = keys.bitwise_and_(1).nonzero()[:, 1]
    return positions.view(scores.shape[0], end - start) + 1


def _ranks_by_stable_sort(scores, layout: _GalleryLayout, start: int) -> torch.Tensor:
    """Exact ranks with the tie rule for any dtype: a stable sort in gallery order."""
    in_gallery_order = torch.empty_like(scores)
    in_gallery_order[:, layout.original_index] = scores
    order = torch.sort(in_gallery_order, dim=1, descending=True, stable=True).indices
    cls = layout.classes[layout.original_index[start]]
    positions = (layout.classes[order] == cls).nonzero()[:, 1]
    return positions.view(scores.shape[0], -1) + 1


def _descending_score_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 that increases as the float32 score decreases (order-preserving bit trick)."""
    bits = scores.view(torch.int32)
    # Negative floats order backwards as integers: flip their magnitude bits.
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return bits.bitwise_not_().to(torch.int64)


# ----------------------------------------------------------------------------- metrics

def _metrics_from_ranks(ranks, n_gallery: int, protocol: str, map_at, prec_at) -> torch.Tensor:
    """(m x n_metrics) float64 from relevant ranks (m x R, ascending, 1-based)."""
    ranks = ranks.to(torch.float64)
    n_relevant = ranks.shape[1]
    hits_so_far = torch.arange(1, n_relevant + 1, dtype=torch.float64, device=ranks.device)
    precision = hits_so_far / ranks  # precision at each relevant position
    columns = [_average_precision(precision, n_relevant, protocol)]
    for k in map_at:
        columns.append(_average_precision_at(precision, ranks, min(k, n_gallery), protocol))
    for k in prec_at:
        cutoff = min(k, n_gallery)
        columns.append((ranks <= cutoff).sum(dim=1).to(torch.float64) / cutoff)
    return torch.stack(columns, dim=1)


def _average_precision(precision: torch.Tensor, n_relevant: int, protocol: str) -> torch.Tensor:
    if protocol == "voc":
        precision = _suffix_max(precision)
    return precision.sum(dim=1) / n_relevant


def _average_precision_at(precision, ranks, cutoff: int, protocol: str) -> torch.Tensor:
    # Relevant items inside the top K' are a prefix of the rank list, at most K' long.
    width = min(precision.shape[1], cutoff)
    inside = (ranks[:, :width] <= cutoff).to(torch.float64)
    precision = precision[:, :width] * inside
    n_inside = inside.sum(dim=1)
    if protocol == "voc":
        # Zeros past the cut-off keep the envelope inside the truncated list.
        return (_suffix_max(precision) * inside).sum(dim=1) / width  # min(K', R)
    return torch.where(n_inside > 0, precision.sum(dim=1) / n_inside.clamp(min=1), 0.0)


def _suffix_max(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1).cummax(dim=1).values.flip(1)


def _average(per_query: torch.Tensor, query_classes, per_class: bool, names) -> dict[str, float]:
    if per_class:
        rows = [_nanmean(per_query[query_classes == c]) for c in query_classes.unique()]
        per_query = torch.stack(rows)
    means = _nanmean(per_query)
    return {name: float(v) for name, v in zip(names, means)}


def _nanmean(x: torch.Tensor) -> torch.Tensor:
    """Column means over rows that are not NaN; NaN where a column has none."""
    valid = ~torch.isnan(x)
    total = torch.where(valid, x, 0.0).sum(dim=0)
    count = valid.sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), float("nan"))


# ----------------------------------------------------------------------------- fine-grained

def instance_accuracy(
    query_emb,
    query_instance,
    gallery_emb,
    gallery_instance,
    query_group=None,
    gallery_group=None,
    ks: Sequence[int] = (1, 5),
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """acc@K of instance-level retrieval: the share of queries whose true match ranks in the top K.

    Definitions and sources: docs/metrics.md, "Fine-grained ZS-SBIR (protocol fg)".

    Args:
        query_emb, gallery_emb: (n_queries x d) and (n_gallery x d) embeddings; ranked by cosine.
        query_instance, gallery_instance: integer instance ids; a query's true match is the
            gallery item with its id. Every query must have exactly one, and a gallery id may
            appear only once.
        query_group, gallery_group: optional integer groups (the category): each query then
            ranks only the gallery items of its own group (eval.fg_gallery=category); its
            true match must be in that group. None on both: every gallery item competes.
        ks: the cut-offs K, reported as ``acc_<K>``.

    Ties are broken by gallery index like every other metric here: an item with exactly
    the true match's score ranks above it when its index is lower. Returns ``acc_<K>`` per
    K plus ``n_queries`` and ``n_gallery``.
    """
    if (query_group is None) != (gallery_group is None):
        raise ValueError("instance_accuracy: give query_group and gallery_group together, or neither")
    device = torch.device(device) if device is not None else _default_device(query_emb)
    queries, gallery = _as_float_tensor(query_emb), _as_float_tensor(gallery_emb)
    dtype = torch.promote_types(queries.dtype, gallery.dtype)
    queries, gallery = queries.to(dtype), gallery.to(device, dtype)
    check_finite(queries, "query")
    check_finite(gallery, "gallery")
    q_inst, g_inst = _labels_tensor(query_instance), _labels_tensor(gallery_instance)
    if queries.shape[0] != q_inst.numel() or gallery.shape[0] != g_inst.numel():
        raise ValueError("instance_accuracy: embeddings and instance ids disagree in length")
    target = _true_matches(q_inst, g_inst)
    grouped = query_group is not None
    if grouped:
        q_group, g_group = _labels_tensor(query_group), _labels_tensor(gallery_group)
        if q_group.numel() != q_inst.numel() or g_group.numel() != g_inst.numel():
            raise ValueError("instance_accuracy: groups and instance ids disagree in length")
        strays = int((g_group[target] != q_group).sum())
        if strays:
            raise ValueError(f"instance_accuracy: {strays} queries have their true match in another group "
                             "(category); the pairing and the class labels disagree")
        g_group = g_group.to(device)
    queries, gallery = F.normalize(queries, dim=1), F.normalize(gallery, dim=1)
    # Score each distinct gallery vector once: a matrix product may round two equal columns
    # differently (blocked kernels), which would break exact ties between duplicate photos.
    distinct, copy_of = torch.unique(gallery, dim=0, return_inverse=True)
    index = torch.arange(gallery.shape[0], device=device)
    ranks = torch.empty(queries.shape[0], dtype=torch.long)
    for rows in torch.arange(queries.shape[0]).split(chunk_size or default_chunk_size(gallery.shape[0])):
        scores = _ranking_scores((queries[rows].to(device) @ distinct.T)[:, copy_of])
        true_index = target[rows].to(device)
        true_score = scores.gather(1, true_index[:, None])
        above = (scores > true_score) | ((scores == true_score) & (index[None, :] < true_index[:, None]))
        if grouped:
            above &= g_group[None, :] == q_group[rows].to(device)[:, None]
        ranks[rows] = (above.sum(dim=1) + 1).cpu()
    result = {f"acc_{k}": float((ranks <= k).double().mean()) for k in ks}
    result["n_queries"] = int(queries.shape[0])
    result["n_gallery"] = int(gallery.shape[0])
    return result


def _true_matches(query_instance: torch.Tensor, gallery_instance: torch.Tensor) -> torch.Tensor:
    """Gallery index of each query's instance; one clear error for repeated or missing ids."""
    ids, counts = torch.unique(gallery_instance, return_counts=True)
    if bool((counts > 1).any()):
        repeated = ids[counts > 1][:5].tolist()
        raise ValueError(f"instance_accuracy: the gallery holds instance ids {repeated} more than once; "
                         "each photo must appear once in a fine-grained gallery")
    order = torch.argsort(gallery_instance)
    position = torch.searchsorted(gallery_instance[order], query_instance).clamp(max=max(0, len(order) - 1))
    found = (gallery_instance[order][position] == query_instance) if len(order) else torch.zeros_like(query_instance, dtype=torch.bool)
    if not bool(found.all()):
        missing = query_instance[~found][:5].tolist()
        raise ValueError(f"instance_accuracy: {int((~found).sum())} queries have no true match in the gallery "
                         f"(instance ids {missing}...); the gallery must hold the photo of every query sketch")
    return order[position]
