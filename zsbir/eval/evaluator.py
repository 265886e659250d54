"""The one Evaluator: loaders, embedding, metrics, grids and results files of a protocol.

The trainer (seen-class validation, the before/after test rows, metrics.json), the eval
CLI (`python -m zsbir.eval`, eval_metrics.json) and `zsbir.bench` all evaluate through
it, so a protocol added in zsbir/eval/protocols.py reaches all three. It only calls
`encoder(images, domain)["embedding"]`; it never imports a model class.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from zsbir.eval.protocols import DEFAULT_METRICS, Protocol, get_protocol
from zsbir.eval.retrieval import Embeddings, embed_split, format_table, table_keys


# How errors and warnings name a split (e.g. non-finite embeddings).
SPLIT_NAMES = {"test": "unseen-class test", "val": "seen-class validation"}


class Evaluator:
    """Evaluate encoders on one dataset split object (`SplitData`) under one protocol.

    `amp` is the autocast dtype of the embedding pass (None: fp32); metrics are always
    computed in float32. Loaders are built once per Evaluator and split, so images kept
    in memory (data.cache_images) are decoded once, not at every evaluation.
    """

    def __init__(self, data, data_cfg, eval_cfg, norm: str, device: torch.device, amp=None,
                 protocol: str | Protocol = "zs"):
        self.data, self.data_cfg, self.eval_cfg = data, data_cfg, eval_cfg
        self.norm, self.device, self.amp = norm, device, amp
        self.protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
        self._loaders: dict[str, tuple] = {}

    @property
    def precision(self) -> str:
        """The embedding precision actually used: fp32 unless autocast runs (CUDA only)."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp, "fp32")

    def task(self, split: str = "test"):
        return self.protocol.task(self.data, split)

    def loaders(self, split: str = "test") -> tuple:
        """(query loader, gallery loader) of `split`, built once."""
        from zsbir.data.datamodule import eval_loader

        if split not in self._loaders:
            task = self.task(split)
            self._loaders[split] = (eval_loader(self.data, task.queries, task.query_domain, self.data_cfg, self.norm),
                                    eval_loader(self.data, task.gallery, task.gallery_domain, self.data_cfg, self.norm))
        return self._loaders[split]

    def embed(self, encoder, split: str = "test") -> Embeddings:
        task = self.task(split)
        queries, gallery = self.loaders(split)
        return embed_split(encoder, queries, gallery, self.device, self.amp,
                           domains=(task.query_domain, task.gallery_domain))

    def score(self, embeddings: Embeddings, split: str = "test") -> dict:
        return self.protocol.score(embeddings, self.eval_cfg, self.device, SPLIT_NAMES.get(split, split))

    def evaluate(self, encoder, split: str = "test") -> dict:
        return self.score(self.embed(encoder, split), split)

    def evaluate_with_embeddings(self, encoder, split: str = "test") -> tuple[dict, Embeddings]:
        embeddings = self.embed(encoder, split)
        return self.score(embeddings, split), embeddings

    def write_grids(self, embeddings: Embeddings, out_dir: Path, split: str = "test") -> list[Path]:
        """Retrieval grids of sampled queries (eval.grids) into `out_dir`."""
        from zsbir.eval.visualize import write_retrieval_grids

        task = self.task(split)
        return write_retrieval_grids(embeddings, self.data.root, task.queries, task.gallery, task.class_names,
                                     Path(out_dir), **(self.eval_cfg.get("grids") or {}))

    def table_keys(self) -> list[str]:
        """Columns of the results table: the dataset's metrics, the defaults, their binary versions."""
        return table_keys(self.data_cfg.metrics, self.eval_cfg, DEFAULT_METRICS)

    def table(self, rows: dict[str, dict]) -> str:
        return format_table(rows, self.table_keys(), str(self.eval_cfg.protocol), title=self.protocol.title)

    def describe(self) -> dict:
        """The metrics.json fields that say how the numbers were computed."""
        return {"protocol": str(self.eval_cfg.protocol), "per_class": bool(self.eval_cfg.per_class),
                "metrics_order": self.table_keys()}

    def write_results(self, out_dir: Path, json_name: str, result: dict, table: str) -> None:
        """`<out_dir>/<json_name>` (the result dict) and `<out_dir>/results.txt` (the table)."""
        from zsbir.engine.checkpoint import write_text_atomic

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / json_name, json.dumps(result, indent=2) + "\n")
        write_text_atomic(out_dir / "results.txt", table + "\n")
