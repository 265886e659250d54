"""Relation-network evaluation (`eval.rerank`): a pair network scores sketch-photo pairs.

ZSE-SBIR has two test modes. Retrieval mode is the standard evaluator (one embedding per
image, cosine ranking: key `test` of metrics.json). Relation-network mode ranks the gallery
of each query by the model's pair score (`encoder.relation_logits(sketch_seq, photo_seq)`),
which has to run once per (query, photo) PAIR; its metrics go under `test_rerank`:

- `mode: exhaustive`: every query against every gallery photo, as the paper evaluates
  (official test.py -r rn). Cost: n_queries x n_gallery pair passes (docs/benchmarks.md).
- `mode: top_n`: only each query's `top_n` best photos in retrieval mode are scored and
  re-ordered by the pair score; the rest keep their retrieval order after them. With
  `top_n` = gallery size it ranks exactly as `exhaustive` (tests/test_zse.py).

Memory is bounded by design: the image token sequences are computed once per item and kept
in `token_dtype`, in a memory-mapped file in a temporary folder (`token_store: disk`, under
`token_dir` or the system's temporary directory; deleted afterwards) or in RAM
(`memory`); pairs are scored `pair_batch` at a time on the device; the
metric engine (zsbir/eval/metrics.py) asks for one chunk of queries' score rows at a time
(`scores_fn`), so no n_queries x n_gallery matrix is ever built.

Ranking uses the relation LOGIT (sigmoid(logit) is the score): the same order without the
ties sigmoid's saturation creates in float32. Metrics: the same definitions and settings as
retrieval mode (eval.protocol, map_at, prec_at, per_class); in `top_n` mode AP is computed
over the whole re-ordered list (docs/metrics.md, "Re-ranked metrics").
"""
from __future__ import annotations

import logging
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zsbir.choices import RERANK_MODES
from zsbir.errors import ZsbirError
from zsbir.eval.metrics import retrieval_metrics
from zsbir.eval.retrieval import format_table

log = logging.getLogger(__name__)

RESULT_KEY = "test_rerank"  # metrics.json / eval_metrics.json key of the re-ranked metrics
TOKEN_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}  # token_store=disk (NumPy has no bf16)
TOKEN_STORES = ("disk", "memory")


class RerankError(ZsbirError):
    """eval.rerank cannot run with this model or these settings; the message names the fix."""


def rerank_settings(eval_cfg) -> dict | None:
    """The eval.rerank node as a dict, or None when re-ranking is off (mode null)."""
    settings = dict(eval_cfg.get("rerank") or {})
    mode = settings.get("mode")
    if not mode:
        return None
    if mode not in RERANK_MODES:
        raise RerankError(f"eval.rerank.mode={mode!r}: must be one of {'|'.join(RERANK_MODES)} or null")
    if str(settings.get("token_dtype", "fp16")) not in TOKEN_DTYPES:
        raise RerankError(f"eval.rerank.token_dtype={settings.get('token_dtype')!r}: must be one of "
                          f"{'|'.join(TOKEN_DTYPES)}")
    if str(settings.get("token_store", "disk")) not in TOKEN_STORES:
        raise RerankError(f"eval.rerank.token_store={settings.get('token_store')!r}: must be one of "
                          f"{'|'.join(TOKEN_STORES)}")
    if settings.get("token_store", "disk") == "disk" and TOKEN_DTYPES[str(settings.get("token_dtype", "fp16"))] \
            not in NUMPY_DTYPES:
        raise RerankError("eval.rerank.token_store=disk keeps fp16 or fp32 tokens (NumPy has no bf16): set "
                          "eval.rerank.token_dtype=fp16, or eval.rerank.token_store=memory")
    return settings


def has_pair_scorer(encoder) -> bool:
    """Whether the model scores (sketch, photo) pairs itself (a relation network: `relation_logits`)."""
    return callable(getattr(encoder, "relation_logits", None))


def check_pair_model(encoder) -> None:
    if not has_pair_scorer(encoder):
        raise RerankError(f"eval.rerank needs a model with a relation network (model=zse_sbir); "
                          f"{type(encoder).__name__} has none: set eval.rerank.mode=null")


@torch.no_grad()
def token_sequences(encoder, loader, domain: str, device: torch.device, amp=None,
                    dtype: torch.dtype = torch.float16, store_dir: str | Path | None = None) -> torch.Tensor:
    """(n x tokens x width) "sequence" outputs of every item of `loader`, in list order, on the CPU.

    With `store_dir` they are written to a memory-mapped .npy file there (RAM stays bounded:
    the OS pages it in as pairs are scored), else kept in RAM.
    """
    was_training = encoder.training
    encoder.eval()
    store, row = None, 0
    for images, _, _ in loader:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = encoder(images.to(device, non_blocking=True), domain)
        if "sequence" not in out:
            raise RerankError(f"eval.rerank needs the encoder output 'sequence' (CLS + patch tokens); "
                              f"{type(encoder).__name__} gives only {sorted(out)}")
        part = out["sequence"].to("cpu", dtype)
        if store is None:
            shape = (len(loader.dataset), *part.shape[1:])
            store = (torch.from_numpy(np.lib.format.open_memmap(Path(store_dir) / f"{domain}.npy", mode="w+",
                                                                dtype=NUMPY_DTYPES[dtype], shape=shape))
                     if store_dir is not None else torch.empty(shape, dtype=dtype))
        store[row:row + len(part)] = part
        row += len(part)
    encoder.train(was_training)
    if store is None or row != len(store):
        raise RerankError(f"eval.rerank: the {domain} loader gave {row} items, its list has {len(loader.dataset)}")
    return store


class PairScorer:
    """Relation logits of (query row, gallery row) pairs, `pair_batch` pairs per network call."""

    def __init__(self, encoder, query_seqs: torch.Tensor, gallery_seqs: torch.Tensor, device: torch.device,
                 pair_batch: int = 128, amp=None):
        if pair_batch < 1:
            raise RerankError(f"eval.rerank.pair_batch must be >= 1, got {pair_batch}")
        self.encoder, self.device, self.amp = encoder, device, amp
        self.queries, self.gallery = query_seqs, gallery_seqs
        self.pair_batch = int(pair_batch)
        self.pairs_scored = 0
        self.total_pairs: int | None = None  # for the progress log, when known
        self._last_log = time.perf_counter()

    @torch.no_grad()
    def __call__(self, query_rows: torch.Tensor, gallery_rows: torch.Tensor) -> torch.Tensor:
        """float64 logits (len(query_rows),) of the pairs (query_rows[i], gallery_rows[i])."""
        was_training = self.encoder.training
        self.encoder.eval()
        out = torch.empty(len(query_rows), dtype=torch.float64)
        for start in range(0, len(query_rows), self.pair_batch):
            q = query_rows[start:start + self.pair_batch]
            g = gallery_rows[start:start + self.pair_batch]
            sketches = self.queries[q].to(self.device, torch.float32, non_blocking=True)
            photos = self.gallery[g].to(self.device, torch.float32, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.encoder.relation_logits(sketches, photos)
            out[start:start + len(q)] = logits.double().cpu()
        self.encoder.train(was_training)
        self.pairs_scored += len(query_rows)
        if time.perf_counter() - self._last_log > 60:  # exhaustive mode runs for hours: say how far it is
            self._last_log = time.perf_counter()
            log.info("eval.rerank: %d%s pairs scored", self.pairs_scored,
                     f" of {self.total_pairs}" if self.total_pairs else "")
        return out


def retrieval_order(queries: torch.Tensor, gallery: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine scores, gallery indices best first) in float32, ties by gallery index as the metrics rank them."""
    scores = (F.normalize(queries.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T).add_(0.0)
    return scores, torch.sort(scores, dim=1, descending=True, stable=True).indices


def exhaustive_scores(scorer: PairScorer, query_rows: torch.Tensor) -> torch.Tensor:
    """(m x n_gallery) relation logits of the queries against every gallery item (gallery order)."""
    n = len(scorer.gallery)
    everything = torch.arange(n)
    # one query at a time: the pair index lists stay gallery-sized whatever the chunk size
    return torch.stack([scorer(row.repeat(n), everything) for row in query_rows]) if len(query_rows) else \
        torch.empty(0, n, dtype=torch.float64)


def top_n_scores(scorer: PairScorer, query_rows: torch.Tensor, query_emb: torch.Tensor, gallery_emb: torch.Tensor,
                 top_n: int) -> torch.Tensor:
    """(m x n_gallery) ranking scores: the retrieval top-N by relation logit, then the rest in retrieval order."""
    cosine, order = retrieval_order(query_emb[query_rows], gallery_emb)
    shortlist = order[:, :min(top_n, gallery_emb.shape[0])]
    logits = scorer(query_rows.repeat_interleave(shortlist.shape[1]), shortlist.flatten()).view(shortlist.shape)
    # every unlisted item strictly below the row's lowest shortlisted logit, in cosine order (cosine <= 1)
    scores = cosine.double() + (logits.min(dim=1).values - 3.0)[:, None]
    return scores.scatter_(1, shortlist, logits)


def rerank_metrics(encoder, embeddings, query_seqs: torch.Tensor, gallery_seqs: torch.Tensor, eval_cfg,
                   device: torch.device, settings: dict, amp=None) -> dict:
    """Metrics of the relation-network ranking (plus mode, top_n, pairs scored, seconds)."""
    check_pair_model(encoder)
    mode = settings["mode"]
    scorer = PairScorer(encoder, query_seqs, gallery_seqs, device, int(settings.get("pair_batch", 128)), amp)
    top_n = int(settings.get("top_n", 100))
    if mode == "top_n" and top_n < 1:
        raise RerankError(f"eval.rerank.top_n must be >= 1, got {top_n}")
    per_query = len(gallery_seqs) if mode == "exhaustive" else min(top_n, len(gallery_seqs))
    scorer.total_pairs = len(query_seqs) * per_query

    def scores_fn(query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> torch.Tensor:
        rows = query_ids[:, 0].long().cpu()
        if mode == "exhaustive":
            scores = exhaustive_scores(scorer, rows)
        else:
            scores = top_n_scores(scorer, rows, embeddings.queries, embeddings.gallery, top_n)
        return scores[:, gallery_ids[:, 0].long().cpu()].to(query_ids.device)

    # The metric engine passes the "embeddings" to scores_fn as they are: item ids here.
    ids = [torch.arange(n, dtype=torch.float64)[:, None] for n in (len(query_seqs), len(gallery_seqs))]
    start = time.perf_counter()
    metrics = retrieval_metrics(ids[0], embeddings.query_labels, ids[1], embeddings.gallery_labels,
                                protocol=str(eval_cfg.protocol), map_at=tuple(eval_cfg.map_at),
                                prec_at=tuple(eval_cfg.prec_at), per_class=bool(eval_cfg.per_class),
                                chunk_size=eval_cfg.get("chunk_size"), scores_fn=scores_fn)
    seconds = time.perf_counter() - start
    metrics.update(mode=mode, top_n=top_n if mode == "top_n" else None, pairs_scored=scorer.pairs_scored,
                   score_seconds=round(seconds, 3),
                   ms_per_1000_pairs=round(1e6 * seconds / max(1, scorer.pairs_scored), 3))
    return metrics


def evaluate_rerank(evaluator, encoder, embeddings, settings: dict) -> dict:
    """Re-ranked metrics of the zs protocol's test split (`evaluator` of protocol zs, its `embeddings`)."""
    check_pair_model(encoder)
    if evaluator.protocol.name != "zs":
        raise RerankError("eval.rerank re-ranks the zs protocol: add zs to eval.protocols")
    dtype = TOKEN_DTYPES[str(settings.get("token_dtype", "fp16"))]
    task = evaluator.task("test")
    query_loader, gallery_loader = evaluator.loaders("test")
    on_disk = str(settings.get("token_store", "disk")) == "disk"
    with tempfile.TemporaryDirectory(prefix="zsbir-rerank-", dir=settings.get("token_dir")) if on_disk \
            else nullcontext() as store_dir:
        start = time.perf_counter()
        query_seqs = token_sequences(encoder, query_loader, task.query_domain, evaluator.device, evaluator.amp,
                                     dtype, store_dir)
        gallery_seqs = token_sequences(encoder, gallery_loader, task.gallery_domain, evaluator.device,
                                       evaluator.amp, dtype, store_dir)
        embed_seconds = time.perf_counter() - start
        size = (query_seqs.numel() + gallery_seqs.numel()) * query_seqs.element_size() / 2**20
        log.info("eval.rerank: %s over %d queries x %d photos (token sequences: %.1f MiB %s)", settings["mode"],
                 len(query_seqs), len(gallery_seqs), size, f"in {store_dir}" if on_disk else "in RAM")
        metrics = rerank_metrics(encoder, embeddings, query_seqs, gallery_seqs, evaluator.eval_cfg,
                                 evaluator.device, settings, evaluator.amp)
        del query_seqs, gallery_seqs  # release the memory maps before their folder goes
    metrics["embed_seconds"] = round(embed_seconds, 3)
    return metrics


def rerank_table(evaluator, label: str, metrics: dict) -> str:
    """The results-table block of the re-ranked metrics."""
    mode = metrics["mode"] if metrics["mode"] == "exhaustive" else f"top-{metrics['top_n']}"
    return format_table({label: metrics}, evaluator.table_keys(), str(evaluator.eval_cfg.protocol),
                        title=f"unseen-class retrieval, relation-network re-ranking ({mode})")
