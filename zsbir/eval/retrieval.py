"""Zero-shot retrieval evaluation: embed queries (sketches) and gallery (photos), score them.

The evaluator only calls `model(images, domain)["embedding"]`; it never imports a model class.
With `eval.binary.enabled`, the real-valued embeddings are also turned into ITQ codes and
ranked by Hamming distance; those metrics carry the prefix `bin<bits>/` (`bin64/map_all`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from zsbir.errors import ZsbirError
from zsbir.eval.hashing import ITQ, hamming_retrieval_metrics
from zsbir.eval.metrics import retrieval_metrics

BINARY_FIT_ON = ("gallery", "queries", "all")


class EvalConfigError(ZsbirError):
    """An `eval.*` setting cannot be used with these embeddings; the message names the fix."""


@dataclass
class Embeddings:
    """Query (sketch) and gallery (photo) embeddings with their labels, float32 on the CPU."""

    queries: torch.Tensor
    query_labels: torch.Tensor
    gallery: torch.Tensor
    gallery_labels: torch.Tensor

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)

METRIC_NAMES = {"map_all": "mAP@all"}


def metric_label(key: str) -> str:
    """`map_200` -> `mAP@200`, `prec_100` -> `P@100`."""
    prefix, _, key = key.rpartition("/")
    if prefix:
        return f"{prefix} {metric_label(key)}"
    if key in METRIC_NAMES:
        return METRIC_NAMES[key]
    kind, _, k = key.partition("_")
    return {"map": "mAP", "prec": "P"}.get(kind, kind) + f"@{k}"


@torch.no_grad()
def embed(model, loader: DataLoader, domain: str, device: torch.device, amp_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (float32, on CPU) and labels of every item of `loader`, in list order."""
    was_training = model.training
    model.eval()
    chunks, labels = [], []
    for images, batch_labels, _ in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(images, domain)["embedding"]
        chunks.append(out.float().cpu())
        labels.append(torch.as_tensor(batch_labels))
    model.train(was_training)
    return torch.cat(chunks), torch.cat(labels)


def embed_split(model, query_loader: DataLoader, gallery_loader: DataLoader, device: torch.device,
                amp_dtype=None) -> Embeddings:
    queries, query_labels = embed(model, query_loader, "sketch", device, amp_dtype)
    gallery, gallery_labels = embed(model, gallery_loader, "photo", device, amp_dtype)
    return Embeddings(queries, query_labels, gallery, gallery_labels)


def evaluate(model, query_loader: DataLoader, gallery_loader: DataLoader, eval_cfg, device: torch.device,
             amp_dtype=None) -> dict:
    return evaluate_with_embeddings(model, query_loader, gallery_loader, eval_cfg, device, amp_dtype)[0]


def evaluate_with_embeddings(model, query_loader: DataLoader, gallery_loader: DataLoader, eval_cfg,
                             device: torch.device, amp_dtype=None) -> tuple[dict, Embeddings]:
    """`evaluate`, also returning the embeddings (for retrieval grids and the embedding cache)."""
    embeddings = embed_split(model, query_loader, gallery_loader, device, amp_dtype)
    return score_embeddings(embeddings, eval_cfg, device), embeddings


def score_embeddings(embeddings: Embeddings, eval_cfg, device: torch.device) -> dict:
    """Real-valued metrics, plus `bin<bits>/...` Hamming metrics when `eval.binary.enabled`."""
    settings = dict(
        protocol=str(eval_cfg.protocol), map_at=tuple(eval_cfg.map_at), prec_at=tuple(eval_cfg.prec_at),
        per_class=bool(eval_cfg.per_class), chunk_size=eval_cfg.get("chunk_size"),
        device=device if device.type == "cuda" else None,
    )
    e = embeddings
    metrics = retrieval_metrics(e.queries, e.query_labels, e.gallery, e.gallery_labels, **settings)
    binary = eval_cfg.get("binary")
    if binary and binary.get("enabled"):
        metrics.update(binary_metrics(e, int(binary.bits), str(binary.fit_on), settings,
                                      iterations=int(binary.get("iterations", 50)), seed=int(binary.get("seed", 0))))
    metrics["n_queries"], metrics["n_gallery"] = len(e.queries), len(e.gallery)
    return metrics


def binary_metrics(embeddings: Embeddings, bits: int, fit_on: str, settings: dict, iterations: int = 50,
                   seed: int = 0) -> dict[str, float]:
    """ITQ codes fitted on `fit_on` (never on labels), ranked by Hamming distance; keys `bin<bits>/<metric>`."""
    if fit_on not in BINARY_FIT_ON:
        raise EvalConfigError(f"eval.binary.fit_on must be one of {BINARY_FIT_ON}, got {fit_on!r}")
    # ITQ works on the cosine geometry the real-valued metrics use.
    queries, gallery = F.normalize(embeddings.queries, dim=1), F.normalize(embeddings.gallery, dim=1)
    fit_features = {"gallery": gallery, "queries": queries, "all": torch.cat([queries, gallery])}[fit_on]
    limit = min(fit_features.shape)
    if not 0 < bits <= limit:
        raise EvalConfigError(
            f"eval.binary.bits={bits} is more than ITQ can fit: at most min(items, embedding dim) = "
            f"min{tuple(fit_features.shape)} = {limit} for eval.binary.fit_on={fit_on}. "
            f"Set eval.binary.bits to at most {limit}"
        )
    itq = ITQ(bits=bits, iterations=iterations, seed=seed).fit(fit_features)
    result = hamming_retrieval_metrics(itq.encode(queries), embeddings.query_labels, itq.encode(gallery),
                                       embeddings.gallery_labels, **settings)
    return {f"bin{bits}/{k}": v for k, v in result.items() if k not in ("n_queries", "n_gallery")}


def table_keys(data_metrics, eval_cfg, default_metrics=()) -> list[str]:
    """Columns of the results table: the dataset's metrics, the defaults, then their binary versions."""
    keys = list(dict.fromkeys([*data_metrics, *default_metrics]))
    binary = eval_cfg.get("binary")
    if binary and binary.get("enabled"):
        keys += [f"bin{int(binary.bits)}/{k}" for k in keys]
    return keys


def ranked_gallery(queries: torch.Tensor, gallery: torch.Tensor, top_k: int) -> torch.Tensor:
    """(n_queries x top_k) gallery indices by descending cosine, ties by gallery index (lower first).

    The same tie rule as `retrieval_metrics`: a stable sort of the scores in gallery order.
    """
    scores = F.normalize(queries.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T
    order = torch.sort(scores.add_(0.0), dim=1, descending=True, stable=True).indices
    return order[:, :min(top_k, gallery.shape[0])]


def format_table(rows: dict[str, dict], keys: list[str], protocol: str) -> str:
    """A fixed-width table: one row per model, one column per metric (in `keys` order)."""
    labels = [metric_label(k) for k in keys]
    first = max(len("model"), *(len(r) for r in rows))
    widths = [max(8, len(label)) for label in labels]
    header = "model".ljust(first) + "  " + "  ".join(l.rjust(w) for l, w in zip(labels, widths))
    lines = [f"unseen-class retrieval (protocol: {protocol})", header, "-" * len(header)]
    for name, metrics in rows.items():
        cells = [f"{metrics.get(k, float('nan')):.4f}".rjust(w) for k, w in zip(keys, widths)]
        lines.append(name.ljust(first) + "  " + "  ".join(cells))
    return "\n".join(lines)
