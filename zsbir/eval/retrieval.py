"""Zero-shot retrieval evaluation: embed queries (sketches) and gallery (photos), score them.

The evaluator only calls `model(images, domain)["embedding"]`; it never imports a model class.
With `eval.binary.enabled`, the real-valued embeddings are also turned into ITQ codes and
ranked by Hamming distance; those metrics carry the prefix `bin<bits>/` (`bin64/map_all`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from zsbir.data.iteration import batches
from zsbir.engine import distributed as dist
from zsbir.errors import ZsbirError
from zsbir.eval.hashing import ITQ, hamming_retrieval_metrics
from zsbir.eval.metrics import check_finite, degenerate_embeddings, retrieval_metrics

log = logging.getLogger(__name__)

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


def subset_queries(embeddings: Embeddings, rows) -> Embeddings:
    """The same gallery with only the queries at list positions `rows`."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    return Embeddings(embeddings.queries[rows], embeddings.query_labels[rows], embeddings.gallery,
                      embeddings.gallery_labels)


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


def shard(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """This rank's contiguous slice of an evaluation loader's list (same batch size and workers)."""
    n = len(loader.dataset)
    per_rank = -(-n // world_size)
    part = Subset(loader.dataset, range(min(n, rank * per_rank), min(n, (rank + 1) * per_rank)))
    return DataLoader(part, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, collate_fn=loader.collate_fn)


@torch.no_grad()
def embed(model, loader: DataLoader, domain: str, device: torch.device, amp_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (float32, on CPU) and labels of every item of `loader`, in list order.

    Under a process group every rank embeds its own slice of the list; the slices are
    gathered on every rank and put back in list order by item index, each item exactly once.
    The loader's items are `(image, label, index in the list)`.
    """
    world = dist.world_size()
    if world > 1:
        loader = shard(loader, dist.rank(), world)
    was_training = model.training
    model.eval()
    chunks, labels, indices = [], [], []
    with batches(loader) as loaded:
        for images, batch_labels, batch_indices in loaded:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(images, domain)["embedding"]
            chunks.append(out.float().cpu())
            labels.append(torch.as_tensor(batch_labels))
            indices.append(torch.as_tensor(batch_indices))
    model.train(was_training)
    embeddings, labels, indices = (torch.cat(t) if t else None for t in (chunks, labels, indices))
    if world == 1:
        return embeddings, labels
    if embeddings is None:  # more ranks than items: this rank's slice is empty
        empty = torch.zeros(0, dtype=torch.long)
        embeddings, labels, indices = torch.zeros(0, int(model.embed_dim)), empty, empty
    return restore_order(dist.gather_rows(embeddings), dist.gather_rows(labels.long()), dist.gather_rows(indices.long()))


def restore_order(embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor):
    """Rows sorted by list index; every index 0..n-1 must appear exactly once."""
    order = torch.argsort(indices)
    if not torch.equal(indices[order], torch.arange(len(indices))):
        raise RuntimeError(f"gathered evaluation items are not a permutation of the list ({len(indices)} rows): "
                           "an item was embedded twice or not at all")
    return embeddings[order], labels[order]


def embed_split(model, query_loader: DataLoader, gallery_loader: DataLoader, device: torch.device,
                amp_dtype=None, domains: tuple[str, str] = ("sketch", "photo")) -> Embeddings:
    queries, query_labels = embed(model, query_loader, domains[0], device, amp_dtype)
    gallery, gallery_labels = embed(model, gallery_loader, domains[1], device, amp_dtype)
    return Embeddings(queries, query_labels, gallery, gallery_labels)


def embedding_warnings(embeddings: Embeddings, split: str) -> list[str]:
    """Degenerate-embedding warnings of one split (logged; the trainer also writes them to metrics.json)."""
    warnings = [f"{split}: {w}" for w in degenerate_embeddings(embeddings.queries, embeddings.gallery)]
    for warning in warnings:
        log.warning(warning)
    return warnings


def score_embeddings(embeddings: Embeddings, eval_cfg, device: torch.device, split: str = "evaluation") -> dict:
    """Real-valued metrics, plus `bin<bits>/...` Hamming metrics when `eval.binary.enabled`.

    Non-finite embeddings stop here with the split's name (NonFiniteEmbeddingsError).
    """
    check_finite(embeddings.queries, f"{split} query (sketch)")
    check_finite(embeddings.gallery, f"{split} gallery (photo)")
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


def format_table(rows: dict[str, dict], keys: list[str], protocol: str, title: str = "unseen-class retrieval") -> str:
    """A fixed-width table: one row per model, one column per metric (in `keys` order)."""
    labels = [metric_label(k) for k in keys]
    first = max(len("model"), *(len(r) for r in rows))
    widths = [max(8, len(label)) for label in labels]
    header = "model".ljust(first) + "  " + "  ".join(l.rjust(w) for l, w in zip(labels, widths))
    lines = [f"{title} (protocol: {protocol})", header, "-" * len(header)]
    for name, metrics in rows.items():
        cells = [f"{metrics.get(k, float('nan')):.4f}".rjust(w) for k, w in zip(keys, widths)]
        lines.append(name.ljust(first) + "  " + "  ".join(cells))
    return "\n".join(lines)
