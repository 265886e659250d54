"""The one Evaluator: loaders, embedding, metrics, grids and results files of a protocol.

The trainer (seen-class validation, the before/after test rows, metrics.json), the eval
CLI (`python -m zsbir.eval`, eval_metrics.json) and `zsbir.bench` all evaluate through
it, so a protocol added in zsbir/eval/protocols.py reaches all three. It only calls
`encoder(images, domain)["embedding"]`; it never imports a model class.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from zsbir.data.filelist import FileList
from zsbir.eval.protocols import DEFAULT_METRICS, Protocol, RetrievalTask, get_protocol
from zsbir.eval.retrieval import Embeddings, embed, embed_split, format_table, table_keys


# How errors and warnings name a split (e.g. non-finite embeddings).
SPLIT_NAMES = {"test": "unseen-class test", "val": "seen-class validation"}


class Evaluator:
    """Evaluate encoders on one dataset split object (`SplitData`) under one protocol.

    `amp` is the autocast dtype of the embedding pass (None: fp32); metrics are always
    computed in float32. Loaders are built once per Evaluator and split, so images kept
    in memory (data.keep_decoded_in_memory) are decoded once, not at every evaluation.
    """

    def __init__(self, data, data_cfg, eval_cfg, norm: str, device: torch.device, amp=None,
                 protocol: str | Protocol = "zs"):
        self.data, self.data_cfg, self.eval_cfg = data, data_cfg, eval_cfg
        self.norm, self.device, self.amp = norm, device, amp
        self.protocol = get_protocol(protocol, eval_cfg) if isinstance(protocol, str) else protocol
        self._loaders: dict = {}
        self._tasks: dict[str, RetrievalTask] = {}
        self._siblings: dict[str, Evaluator] = {self.protocol.name: self}
        self.seconds: dict[str, float] = {}  # timings of the last evaluate_protocols

    @property
    def precision(self) -> str:
        """The embedding precision actually used: fp32 unless autocast runs (CUDA only)."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp, "fp32")

    def task(self, split: str = "test") -> RetrievalTask:
        """The protocol's query and gallery lists of `split`, built once (GZS samples are seeded)."""
        if split not in self._tasks:
            self._tasks[split] = self.protocol.task(self.data, split)
        return self._tasks[split]

    def for_protocol(self, name: str) -> "Evaluator":
        """An Evaluator of the same data and settings under protocol `name`, built once."""
        if name not in self._siblings:
            self._siblings[name] = Evaluator(self.data, self.data_cfg, self.eval_cfg, self.norm, self.device,
                                             self.amp, protocol=name)
        return self._siblings[name]

    def embed_protocols(self, encoder, names: list[str], split: str = "test") -> dict[str, Embeddings]:
        """Each protocol's embeddings from one pass per domain over the union of their images.

        GZS shares every unseen-class item with ZS and PBIR's photos are ZS's gallery, so
        `[zs, gzs, pbir]` embeds the ZS items plus GZS's seen-class sample, each image once.
        """
        from zsbir.data.datamodule import eval_loader

        tasks = {name: self.for_protocol(name).task(split) for name in names}
        rows: dict[str, dict[str, int]] = {}  # domain -> {path: row of that domain's union}
        for task in tasks.values():
            for items, domain in ((task.queries, task.query_domain), (task.gallery, task.gallery_domain)):
                union = rows.setdefault(domain, {})
                for path in items.paths:
                    union.setdefault(path, len(union))
        vectors = {}
        for domain, union in rows.items():
            key = ("union", split, tuple(names), domain)
            if key not in self._loaders:
                items = FileList(list(union), [0] * len(union), f"{domain} images of protocols {names}")
                self._loaders[key] = eval_loader(self.data, items, domain, self.data_cfg, self.norm)
            vectors[domain], _ = embed(encoder, self._loaders[key], domain, self.device, self.amp)

        def pick(items, domain):
            index = torch.as_tensor([rows[domain][p] for p in items.paths], dtype=torch.long)
            return vectors[domain][index], torch.as_tensor(items.labels, dtype=torch.long)

        return {name: Embeddings(*pick(t.queries, t.query_domain), *pick(t.gallery, t.gallery_domain))
                for name, t in tasks.items()}

    def evaluate_protocols(self, encoder, names: list[str], split: str = "test") -> dict[str, tuple[dict, Embeddings]]:
        """{protocol: (metrics, embeddings)} of every protocol in `names`, embedded together.

        `self.seconds` keeps the wall time of the shared embedding pass and of each protocol's scoring.
        """
        start = time.perf_counter()
        embeddings = self.embed_protocols(encoder, names, split)
        self.seconds = {"embed": round(time.perf_counter() - start, 3)}
        results = {}
        for name in names:
            start = time.perf_counter()
            results[name] = (self.for_protocol(name).score(embeddings[name], split), embeddings[name])
            self.seconds[f"score_{name}"] = round(time.perf_counter() - start, 3)
        return results

    def results_by_key(self, results: dict[str, tuple[dict, Embeddings]]) -> dict[str, dict]:
        """{metrics.json key: metrics} of `evaluate_protocols` results (zs under `test`)."""
        return {self.for_protocol(name).protocol.result_key: metrics for name, (metrics, _) in results.items()}

    def group_rows(self, label: str, metrics: dict) -> dict[str, dict]:
        """Table rows of one model: all queries, then each query group of the protocol (GZS: unseen, seen)."""
        rows = {label: metrics}
        rows.update({f"{label}, {group} queries": metrics[group] for group in self.task().query_groups
                     if group in metrics})
        return rows

    def tables(self, results: dict[str, tuple[dict, Embeddings]], label: str, first_rows: dict | None = None) -> str:
        """One results table per protocol; `first_rows` (the untrained network) head this protocol's table."""
        parts = []
        for name, (metrics, _) in results.items():
            sibling = self.for_protocol(name)
            rows = dict(first_rows or {}) if sibling is self else {}
            rows.update(sibling.group_rows(label, metrics))
            parts.append(sibling.table(rows))
        return "\n\n".join(parts)

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
        return self.protocol.score(embeddings, self.eval_cfg, self.device, SPLIT_NAMES.get(split, split),
                                   self.task(split))

    def evaluate(self, encoder, split: str = "test") -> dict:
        return self.score(self.embed(encoder, split), split)

    def evaluate_with_embeddings(self, encoder, split: str = "test") -> tuple[dict, Embeddings]:
        embeddings = self.embed(encoder, split)
        return self.score(embeddings, split), embeddings

    def write_grids(self, embeddings: Embeddings, out_dir: Path, split: str = "test") -> list[Path]:
        """Retrieval grids of sampled queries (eval.grids) into `out_dir`."""
        from zsbir.eval.visualize import write_retrieval_grids

        task = self.task(split)
        settings = dict(self.eval_cfg.get("grids") or {})
        settings.pop("protocol", None)  # which protocol's grids: the caller's choice (grids_protocol)
        return write_retrieval_grids(embeddings, self.data.root, task.queries, task.gallery, task.class_names,
                                     Path(out_dir), **settings)

    def grids_protocol(self, names: list[str]) -> str | None:
        """The protocol whose retrieval grids are drawn (eval.grids.protocol, default zs), if it was evaluated."""
        wanted = str((self.eval_cfg.get("grids") or {}).get("protocol") or "zs")
        return wanted if wanted in names else None

    def table_keys(self) -> list[str]:
        """Columns of the results table: the protocol's own metrics (fg: acc@K), else the dataset's
        metrics, the defaults and their binary versions."""
        own = self.protocol.metric_keys()
        if own is not None:
            return own
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
