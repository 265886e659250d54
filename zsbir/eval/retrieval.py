"""Zero-shot retrieval evaluation: embed queries (sketches) and gallery (photos), score them.

The evaluator only calls `model(images, domain)["embedding"]`; it never imports a model class.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from zsbir.engine import distributed as dist

from zsbir.eval.metrics import retrieval_metrics

METRIC_NAMES = {"map_all": "mAP@all"}


def metric_label(key: str) -> str:
    """`map_200` -> `mAP@200`, `prec_100` -> `P@100`."""
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
    for images, batch_labels, batch_indices in loader:
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


def evaluate(model, query_loader: DataLoader, gallery_loader: DataLoader, eval_cfg, device: torch.device,
             amp_dtype=None) -> dict:
    queries, query_labels = embed(model, query_loader, "sketch", device, amp_dtype)
    gallery, gallery_labels = embed(model, gallery_loader, "photo", device, amp_dtype)
    metrics = retrieval_metrics(
        queries, query_labels, gallery, gallery_labels,
        protocol=str(eval_cfg.protocol), map_at=tuple(eval_cfg.map_at), prec_at=tuple(eval_cfg.prec_at),
        per_class=bool(eval_cfg.per_class), chunk_size=eval_cfg.get("chunk_size"),
        device=device if device.type == "cuda" else None,
    )
    metrics["n_queries"], metrics["n_gallery"] = len(queries), len(gallery)
    return metrics


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
