"""The papers' evaluation approach, kept for benchmarking only.

This is how SAKE (and DSN, SEM-PCYC, which copy it) compute the `voc` metrics: the full
query x gallery score matrix at once, then per query a NumPy argsort of the whole
gallery, a Python loop for the VOC precision envelope, and a separate pass (its own
argsort) for every metric. `python -m zsbir.bench eval` times it against
`zsbir.eval.metrics.retrieval_metrics`; use that function for real evaluation.

One deliberate change: the argsort is stable (`kind="stable"`), so exact ties follow the
same rule as ours (lower gallery index first). The papers' default quicksort orders ties
arbitrarily, which would make the two disagree on tied data.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def voc_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """Area under the VOC-interpolated precision/recall curve (SAKE's `VOCap`)."""
    mrec = np.append(0, rec)
    mrec = np.append(mrec, 1)
    mpre = np.append(0, prec)
    mpre = np.append(mpre, 0)
    for ii in range(len(mpre) - 2, -1, -1):
        mpre[ii] = max(mpre[ii], mpre[ii + 1])
    msk = [i != j for i, j in zip(mrec[1:], mrec[0:-1])]
    return float(np.sum((mrec[1:][msk] - mrec[0:-1][msk]) * mpre[1:][msk]))


def average_precision(query_label, scores: np.ndarray, gallery_labels: np.ndarray, top=None) -> float:
    """AP (or AP@top) of one query (SAKE's `eval_AP_inner`); NaN without relevant items."""
    pos_flag = gallery_labels == query_label
    tot = scores.shape[0]
    tot_pos = np.sum(pos_flag)
    sort_idx = np.argsort(-scores, kind="stable")
    tp = pos_flag[sort_idx]
    fp = np.logical_not(tp)
    if top is not None:
        top = min(top, tot)
        tp = tp[:top]
        fp = fp[:top]
        tot_pos = min(top, tot_pos)
    if tot_pos == 0:
        return float("nan")
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / tot_pos
    prec = tp / (tp + fp)
    return voc_ap(rec, prec)


def precision_at(query_label, scores: np.ndarray, gallery_labels: np.ndarray, top=100) -> float:
    """P@top of one query (SAKE's `eval_precision`)."""
    pos_flag = gallery_labels == query_label
    tot = scores.shape[0]
    top = min(top, tot)
    sort_idx = np.argsort(-scores, kind="stable")
    return float(np.sum(pos_flag[sort_idx][:top]) / top)


def cosine_scores(query_emb, gallery_emb) -> np.ndarray:
    """Full float32 cosine score matrix at once, as the papers build it.

    Same arithmetic as `retrieval_metrics` (torch normalise + matmul), so both rank the
    very same float32 scores and near-ties cannot round differently.
    """
    q = F.normalize(torch.as_tensor(query_emb, dtype=torch.float32), dim=1)
    g = F.normalize(torch.as_tensor(gallery_emb, dtype=torch.float32), dim=1)
    return (q @ g.T).numpy()


def reference_metrics(scores: np.ndarray, query_labels, gallery_labels, map_at=(200,), prec_at=(100, 200)) -> dict[str, float]:
    """`voc` metrics averaged over queries (nanmean), one pass over the queries per metric.

    A query without relevant items is NaN for every metric and skipped, as in ours.
    """
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    has_relevant = np.isin(query_labels, gallery_labels)
    passes = {"map_all": lambda q: average_precision(query_labels[q], scores[q], gallery_labels)}
    for k in map_at:
        passes[f"map_{k}"] = lambda q, k=k: average_precision(query_labels[q], scores[q], gallery_labels, top=k)
    for k in prec_at:
        passes[f"prec_{k}"] = lambda q, k=k: precision_at(query_labels[q], scores[q], gallery_labels, top=k)
    result = {}
    for name, per_query in passes.items():
        values = [per_query(q) if has_relevant[q] else np.nan for q in range(scores.shape[0])]
        result[name] = float(np.nanmean(values))
    return result
