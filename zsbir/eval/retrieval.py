"""Zero-shot retrieval evaluation: embed queries (sketches) and gallery (photos), score them.

The evaluator only calls `model(images, domain)["embedding"]`; it never imports a model class.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from zsbir.eval.metrics import retrieval_metrics

METRIC_NAMES = {"map_all": "mAP@all"}


def metric_label(key: str) -> str:
    """`map_200` -> `mAP@200`, `prec_100` -> `P@100`."""
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
