"""A FAISS index of photo embeddings on disk, with the metadata that makes it trustworthy.

An index folder holds `index.faiss` (inner product over L2-normalised embeddings, i.e.
cosine) and `meta.json`: one item per vector (path, class), the checkpoint's SHA-256, the
transform the photos went through, the source, images skipped because they failed to
decode, and for an approximate index its recall@10 against the exact one.

Kinds (`index.kind`):
- `exact`: `IndexFlatIP`, every vector scored; the default.
- `hnsw`: `IndexHNSWFlat` (inner-product metric), a graph; no training, so adding stays cheap.
- `ivf`: `IndexIVFFlat` over `nlist` k-means cells of which `nprobe` are scanned.
- `pq`: every vector scanned as a 4-bit product-quantised code (`pq_m` sub-quantisers, FAISS
  fast scan: SIMD table look-ups), then the best `k x k_factor` re-scored exactly from the stored
  vectors (`IndexRefineFlat`). Unlike a graph or cells, this holds its recall where vectors have
  no neighbourhood structure (1M random 512-d vectors: recall@10 1.000 at p95 9.6 ms, docs/benchmarks.md),
  and builds in seconds.

Rankings follow the evaluator's tie rule: descending score, equal scores by gallery index.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zsbir.errors import ZsbirError

log = logging.getLogger("zsbir.search")

INDEX_FORMAT = 1  # bump when the folder's files change meaning
KINDS = ("exact", "hnsw", "ivf", "pq")
PQ_MIN_TRAIN = 16 * 39  # 16 centroids per sub-quantiser, 39 points each (FAISS k-means warns below that)
RECALL_K = 10
RECALL_QUERIES = 1000


class SearchIndexError(ZsbirError):
    """An index cannot be built, opened or used; the message names the fix."""


class StaleIndexError(SearchIndexError):
    """The index was built by another checkpoint or transform than the one asked for."""


def import_faiss():
    # faiss logs at INFO which CPU build it loaded (a failed AVX2 attempt reads like an error)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError:
        raise SearchIndexError("faiss is not installed: pip install -e \".[app]\" (or pip install faiss-cpu)") from None
    return faiss


@dataclass
class IndexParams:
    kind: str = "exact"
    hnsw_m: int = 32             # graph degree
    ef_construction: int = 200
    ef_search: int = 128         # candidates kept while searching the graph: recall vs. time
    nlist: int | None = None     # IVF cells; None: about 4 sqrt(n), at most n / 39 (k-means needs 39 points a cell)
    nprobe: int = 16             # IVF cells scanned per query
    pq_m: int | None = None      # PQ sub-quantisers (4 bits each); None: d / 2, i.e. 2 dimensions each
    k_factor: int = 100          # PQ: k x k_factor candidates re-scored exactly
    seed: int = 0

    def check(self) -> None:
        if self.kind not in KINDS:
            raise SearchIndexError(f"index.kind={self.kind!r} is not one of {KINDS}; exact is the default, pq, hnsw "
                              "or ivf for galleries of about a million photos")
        if self.k_factor < 1:
            raise SearchIndexError(f"index.k_factor={self.k_factor} must be at least 1 (candidates re-scored per result)")

    def sub_quantisers(self, dim: int) -> int:
        m = int(self.pq_m or (dim // 2 if dim % 2 == 0 else dim))
        if m < 1 or dim % m:
            raise SearchIndexError(f"index.pq_m={m} must divide the embedding size {dim} (each sub-quantiser "
                                   f"codes dim / pq_m dimensions); null picks {dim // 2 if dim % 2 == 0 else dim}")
        return m

    def check_gallery_size(self, n: int) -> None:
        """Refuse a first build the kind cannot train on (called before anything is embedded, too)."""
        if self.kind == "pq" and n < PQ_MIN_TRAIN:
            raise SearchIndexError(f"a pq index needs at least {PQ_MIN_TRAIN} photos to train its quantisers on, got "
                                   f"{n}; use index.kind=exact (small galleries are searched exactly in well under a "
                                   "millisecond)")


def make_index(params: IndexParams, vectors: np.ndarray):
    """A FAISS index of `params.kind` holding `vectors` (n x d, unit rows, float32)."""
    faiss = import_faiss()
    params.check()
    n, dim = vectors.shape
    if params.kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params.hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params.ef_construction)
        index.hnsw.efSearch = int(params.ef_search)
    elif params.kind == "pq":
        params.check_gallery_size(n)
        index = faiss.index_factory(dim, f"PQ{params.sub_quantisers(dim)}x4fs,RFlat", faiss.METRIC_INNER_PRODUCT)
        train = vectors
        if n > 65536:  # 16 centroids a sub-quantiser converge on a sample
            train = vectors[np.random.default_rng(params.seed).choice(n, 65536, replace=False)]
        index.train(np.ascontiguousarray(train))
        index.k_factor = float(params.k_factor)
    else:
        nlist = int(params.nlist or max(1, min(int(4 * math.sqrt(max(n, 1))), n // 39)))
        if n < nlist:
            raise SearchIndexError(f"an ivf index with nlist={nlist} needs at least {nlist} photos to train on, got {n}; "
                              "use index.kind=exact (small galleries are searched exactly in well under a millisecond)")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        train = vectors
        if n > 256 * nlist:  # k-means converges on a sample; all vectors would only cost time
            train = vectors[np.random.default_rng(params.seed).choice(n, 256 * nlist, replace=False)]
        index.train(np.ascontiguousarray(train))
        index.nprobe = int(params.nprobe)
        index.make_direct_map()  # so the vectors can be read back (recall, incremental add)
    if n:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def stored_vectors(index) -> np.ndarray:
    return index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)


def ranked(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n_queries x k'), k' = min(k, size): descending score, ties by id.

    FAISS does not promise an order among equal scores, so a few extra candidates are
    fetched and re-sorted with the evaluator's rule (a stable sort in gallery order).
    """
    k = min(int(k), index.ntotal)
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    fetch = min(index.ntotal, k + max(8, k))
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
    out_scores, out_ids = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    for row, (s, i) in enumerate(zip(scores, ids)):
        valid = i >= 0  # an approximate index may return fewer than asked
        s, i = s[valid], i[valid]
        order = np.lexsort((i, -s))[:k]
        found = len(order)
        out_scores[row, :found], out_ids[row, :found] = s[order], i[order]
        out_scores[row, found:], out_ids[row, found:] = -np.inf, -1
    return out_scores, out_ids


def recall_at_k(approx, exact, queries: np.ndarray, k: int = RECALL_K) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k over `queries`."""
    _, a = ranked(approx, queries, k)
    _, e = ranked(exact, queries, k)
    k = e.shape[1]
    if k == 0:
        return 1.0
    return float(np.mean([len(set(x[x >= 0]) & set(y)) / k for x, y in zip(a, e)]))


def measure_recall(index, params: IndexParams, vectors: np.ndarray) -> dict | None:
    """Recall@10 of an approximate index against exact search, with a seeded sample of the
    gallery's own vectors as queries (no sketch is needed to build an index)."""
    if params.kind == "exact" or len(vectors) == 0:
        return None
    faiss = import_faiss()
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    rng = np.random.default_rng(params.seed)
    picked = rng.choice(len(vectors), min(RECALL_QUERIES, len(vectors)), replace=False)
    return {"k": RECALL_K, "value": recall_at_k(index, exact, vectors[picked]), "queries": len(picked),
            "queries_from": "gallery vectors (seeded sample)"}


@dataclass
class SketchIndex:
    """An index folder in memory: the FAISS index and its metadata."""

    folder: Path
    index: object
    meta: dict = field(default_factory=dict)

    @property
    def items(self) -> list[dict]:
        return self.meta["items"]

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, query: np.ndarray, k: int) -> list[dict]:
        """The top-k photos for one query vector: rank, id, path, class, score."""
        scores, ids = ranked(self.index, query.reshape(1, -1), k)
        root = Path(self.meta["root"])
        return [{"rank": r + 1, "id": int(i), "path": str(root / self.items[i]["path"]),
                 "class": self.items[i].get("class"), "score": float(s)}
                for r, (s, i) in enumerate(zip(scores[0], ids[0])) if i >= 0]

    def save(self) -> None:
        faiss = import_faiss()
        self.folder.mkdir(parents=True, exist_ok=True)
        # Write both under temporary names, then rename: a crash leaves the previous pair.
        tmp_index, tmp_meta = self.folder / ".index.faiss.tmp", self.folder / ".meta.json.tmp"
        faiss.write_index(self.index, str(tmp_index))
        tmp_meta.write_text(json.dumps(self.meta, indent=1) + "\n")
        os.replace(tmp_index, self.folder / "index.faiss")
        os.replace(tmp_meta, self.folder / "meta.json")


def open_index(folder: str | Path) -> SketchIndex:
    faiss = import_faiss()
    folder = Path(folder)
    meta_path, index_path = folder / "meta.json", folder / "index.faiss"
    if not (meta_path.is_file() and index_path.is_file()):
        raise SearchIndexError(f"{folder} is not an index folder (it needs index.faiss and meta.json); "
                          "build one with `python -m zsbir.index run_dir=<run>`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != INDEX_FORMAT:
        raise SearchIndexError(f"{folder} was written by another index format ({meta.get('format')!r}, expected "
                          f"{INDEX_FORMAT}); rebuild it: {meta.get('build_command', 'python -m zsbir.index ...')} rebuild=true")
    index = faiss.read_index(str(index_path))
    if index.ntotal != len(meta["items"]):
        raise SearchIndexError(f"{folder}: index.faiss holds {index.ntotal} vectors but meta.json lists "
                          f"{len(meta['items'])} photos; rebuild it: {meta.get('build_command')} rebuild=true")
    if meta["kind"] == "hnsw":
        index.hnsw.efSearch = int(meta["params"]["ef_search"])
    elif meta["kind"] == "ivf":
        index.nprobe = int(meta["params"]["nprobe"])
    elif meta["kind"] == "pq":
        index.k_factor = float(meta["params"]["k_factor"])
    return SketchIndex(folder, index, meta)


def check_fresh(store: SketchIndex, checkpoint_sha256: str, transform: dict, checkpoint: str) -> None:
    """Refuse an index whose vectors came from another checkpoint or another photo transform."""
    meta = store.meta
    rebuild = f"{meta.get('build_command', 'python -m zsbir.index run_dir=<run>')} rebuild=true"
    if meta["checkpoint_sha256"] != checkpoint_sha256:
        raise StaleIndexError(
            f"index {store.folder} was built with another checkpoint (SHA-256 {meta['checkpoint_sha256'][:12]}…, "
            f"{checkpoint} is now {checkpoint_sha256[:12]}…): its vectors do not match this model. "
            f"Rebuild it: {rebuild}")
    changed = sorted(k for k in set(transform) | set(meta["transform"]) if meta["transform"].get(k) != transform.get(k))
    if changed:
        raise StaleIndexError(
            f"index {store.folder} was built with another photo transform (differs in {', '.join(changed)}): "
            f"its vectors do not match this model's input. Rebuild it: {rebuild}")
