"""Re-ranking a search's top-N with the run's pair scorer (`--rerank N`, the app's re-rank slider).

Models with a relation network (`relation_logits`, model=zse_sbir) score a (sketch, photo)
PAIR. A search first ranks the index by cosine (FAISS); with re-ranking the first N photos
are scored by the pair network and re-ordered by their relation logit (equal logits by
gallery index), the photos after N keep the index's order: the ranking
`eval.rerank.mode=top_n` evaluates (zsbir/eval/rerank.py, whose `PairScorer` and
`token_sequences` run here too). With N = the gallery size it is the exhaustive ranking.

The pair network reads the photos' token sequences, which the index does not hold (a
ViT-B/16 sequence is 197 x 768 values, 0.3 MB in fp16: 300 GB for a million photos,
against 3 KB for an embedding). So the N shortlisted photos are encoded again from their
files: per query N photo encodings plus N pair passes, bounded by N, whatever the size of
the index (docs/search.md, "Re-ranking").
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zsbir.config import RerankSchema
from zsbir.errors import ZsbirError
from zsbir.eval.rerank import PairScorer, has_pair_scorer, token_sequences
from zsbir.search.model import read_transformed


class RerankUsageError(ZsbirError):
    """Re-ranking was asked of a model or index that cannot do it; the message names the fix."""


def check_rerankable(model) -> None:
    """Refuse `--rerank` on a model without a pair scorer, before any index is opened or built."""
    if not has_pair_scorer(model.encoder):
        raise RerankUsageError(
            f"--rerank needs a model with a pair scorer (a relation network: experiment=zse_sbir); the model of "
            f"{model.run_dir.name} ({model.run_cfg.model.get('name')}, {type(model.encoder).__name__}) has none: "
            "search without --rerank (its cosine ranking is the model's own)")


class _ShortlistPhotos(Dataset):
    """The shortlisted photos as `token_sequences` reads a loader: (image, label, index)."""

    def __init__(self, results: list[dict], transform, store):
        self.results, self.transform, self.store = results, transform, store

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int):
        path = self.results[index]["path"]
        image, error = read_transformed(path, self.transform)
        if error:
            rebuild = f"{self.store.meta.get('build_command', 'python -m zsbir.index run_dir=<run>')} rebuild=true"
            raise RerankUsageError(f"photo {path} of index {self.store.folder.name} cannot be read for re-ranking "
                                   f"({error}); it changed since indexing: {rebuild}")
        return image, 0, index


def rerank(model, store, sketch_sequence: torch.Tensor, results: list[dict], top_n: int) -> tuple[list[dict], dict]:
    """`results` (a cosine ranking, best first) with its first `top_n` re-ordered by relation logit.

    Every result gets `index_rank` (its place in the cosine ranking) and `relation_logit` /
    `relation_score` (sigmoid of the logit; None after the shortlist); `rank` is renumbered.
    Returns (results, {"photos_encoded", "pairs_scored", "encode_ms", "pair_ms"}).
    """
    shortlist, rest = results[:top_n], results[top_n:]
    started = time.perf_counter()
    batch_size = int(model.run_cfg.data.get("eval_batch_size", 64))
    loader = DataLoader(_ShortlistPhotos(shortlist, model.transforms["photo"], store), batch_size=batch_size,
                        shuffle=False, num_workers=0)
    photo_sequences = token_sequences(model.encoder, loader, "photo", model.device, model.amp_dtype, torch.float32) \
        if shortlist else torch.empty(0)
    encoded = time.perf_counter()
    # a run configured before eval.rerank existed gets the schema's default
    pair_batch = int((model.run_cfg.eval.get("rerank") or {}).get("pair_batch") or RerankSchema().pair_batch)
    scorer = PairScorer(model.encoder, sketch_sequence, photo_sequences, model.device, pair_batch, model.amp_dtype)
    logits = scorer(torch.zeros(len(shortlist), dtype=torch.long), torch.arange(len(shortlist))).numpy()
    scored = time.perf_counter()

    # descending logit, equal logits by gallery index: the order eval.rerank's stable sort gives
    order = np.lexsort((np.array([r["id"] for r in shortlist], dtype=np.int64), -logits))
    reranked = [dict(shortlist[i], relation_logit=float(logits[i]), relation_score=sigmoid(float(logits[i])))
                for i in order] + [dict(r, relation_logit=None, relation_score=None) for r in rest]
    for rank, result in enumerate(reranked, start=1):
        result["index_rank"], result["rank"] = result["rank"], rank
    return reranked, {"photos_encoded": len(shortlist), "pairs_scored": scorer.pairs_scored,
                      "encode_ms": (encoded - started) * 1e3, "pair_ms": (scored - encoded) * 1e3}


def sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1.0 + math.exp(logit))
