"""Evaluation protocols: which items are queries and gallery, in which domains, and how they are scored.

A protocol is the only thing a new evaluation setting adds (generalized zero-shot,
photo-to-photo, fine-grained): it names its query and gallery lists for a split and
their domains, scores the embeddings (relevance: same class, unless it overrides
`score`) and writes its metrics under its own key of metrics.json (`result_key`). The
`Evaluator` (zsbir/eval/evaluator.py) does the rest: loaders, embedding, precision,
grids, tables and JSON. Register a protocol in `PROTOCOLS`; `eval.protocols` selects
among them (default `[zs]`). Definitions and sources: docs/metrics.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from zsbir.choices import FG_GALLERIES, GZS_SOURCES
from zsbir.data.filelist import FileList
from zsbir.errors import ZsbirError

log = logging.getLogger(__name__)

# Metrics every results table shows, after the dataset's own (data.metrics).
DEFAULT_METRICS = ["map_all", "prec_100", "map_200", "prec_200"]


class UnknownProtocolError(ZsbirError):
    """An evaluation protocol name that is not registered."""


@dataclass(frozen=True)
class RetrievalTask:
    """Query and gallery lists of one protocol on one split, with their domains and class names.

    Labels index `class_names`; relevance is label equality, so a protocol mixing seen and
    unseen classes relabels them into one joint label space. `query_groups` names subsets of
    the queries (list positions) whose metrics are also reported apart (GZS: unseen, seen).
    """

    queries: FileList
    query_domain: str
    gallery: FileList
    gallery_domain: str
    class_names: list[str]
    query_groups: dict[str, np.ndarray] = field(default_factory=dict)


class Protocol:
    """Base class: subclasses set `name`, `result_key` and implement `task`.

    `settings` is the protocol's own node of the eval config (`eval.gzs`, `eval.pbir`), if any.
    """

    name: ClassVar[str]
    result_key: ClassVar[str]  # the key of metrics.json (and eval_metrics.json) its test metrics go under
    title: ClassVar[str]  # first line of its results table
    headline_metric: ClassVar[str] = "map_all"  # the one number a caller reports (python -m zsbir.eval's return)

    def __init__(self, settings=None):
        self.settings = dict(settings or {})

    def task(self, data, split: str) -> RetrievalTask:  # pragma: no cover
        raise NotImplementedError

    def metric_keys(self) -> list[str] | None:
        """Columns of the protocol's results table; None: the retrieval metrics (mAP, P@K)."""
        return None

    def score(self, embeddings, eval_cfg, device, split: str = "evaluation", task: RetrievalTask | None = None) -> dict:
        """Metrics of the embeddings; relevance = same class label. `split` names them in errors.

        Each of the task's query groups is scored again on its own queries (same gallery)
        and nested under its name: `metrics["seen"]["map_all"]`.
        """
        from zsbir.eval.retrieval import score_embeddings, subset_queries

        metrics = score_embeddings(embeddings, eval_cfg, device, split)
        for group, rows in (task.query_groups if task else {}).items():
            if len(rows):
                metrics[group] = score_embeddings(subset_queries(embeddings, rows), eval_cfg, device, f"{split} ({group})")
        return metrics

    def _only_test(self, split: str) -> None:
        if split != "test":
            raise ValueError(f"protocol {self.name} is a test protocol (split 'test'), not {split!r}; "
                             "seen-class validation uses protocol zs")


class ZeroShotProtocol(Protocol):
    """Standard ZS-SBIR: sketches of the unseen classes query the unseen-class photos.

    Split `test` is the unseen-class test split; `val` the seen-class validation split the
    trainer selects best.pt on (held-out seen sketches against a subset of training photos).
    """

    name = "zs"
    result_key = "test"
    title = "unseen-class retrieval"

    def task(self, data, split: str) -> RetrievalTask:
        if split == "test":
            return RetrievalTask(data.zero_sketch, "sketch", data.zero_photo, "photo", data.unseen_classes)
        if split == "val":
            return RetrievalTask(data.val_sketch, "sketch", data.val_photo, "photo", data.seen_classes)
        raise ValueError(f"protocol zs has splits 'test' and 'val', not {split!r}")


class GeneralizedZeroShotProtocol(Protocol):
    """Generalized ZS-SBIR as Sem-PCYC defines it (src/test.py, `--gzs-sbir`, lines 109-126).

    Queries: a seeded sample of seen-class sketches, `fraction` (0.2) of the number of test
    sketches, then every unseen-class test sketch. Gallery: seen-class photos, `fraction` of
    the number of test photos, then every unseen-class photo. Seen items come from the
    training lists (`source: train`, as Sem-PCYC) or from the seen-class validation items
    (`source: val`: the held-out sketches and the validation gallery). Labels: unseen classes
    keep 0..U-1, seen class c becomes U + c, so relevance is by class over the joint space.
    """

    name = "gzs"
    result_key = "gzs"
    title = "generalized zero-shot retrieval (seen + unseen classes)"

    def task(self, data, split: str) -> RetrievalTask:
        self._only_test(split)
        fraction = float(self.settings.get("fraction", 0.2))
        seed = int(self.settings.get("seed", 0))
        source = str(self.settings.get("source", "train"))
        if source not in GZS_SOURCES:
            raise UnknownProtocolError(f"eval.gzs.source={source!r}: must be one of {'|'.join(GZS_SOURCES)}")
        pools = {"train": (data.train_sketch, data.train_photo), "val": (data.val_sketch, data.val_photo)}[source]
        n_unseen = len(data.unseen_classes)
        rng = np.random.default_rng(seed)
        seen_sketch, seen_photo = (
            sample_distinct(pool, int(fraction * len(test)), rng, f"eval.gzs (source {source}) {kind}")
            for pool, test, kind in zip(pools, (data.zero_sketch, data.zero_photo), ("sketches", "photos")))
        queries = joined(seen_sketch, data.zero_sketch, n_unseen)
        gallery = joined(seen_photo, data.zero_photo, n_unseen)
        n_seen = len(seen_sketch)
        groups = {"unseen": np.arange(n_seen, len(queries)), "seen": np.arange(n_seen)}
        return RetrievalTask(queries, "sketch", gallery, "photo", [*data.unseen_classes, *data.seen_classes], groups)


def sample_distinct(pool: FileList, count: int, rng: np.random.Generator, what: str) -> FileList:
    """`count` items of `pool` drawn without replacement (duplicate paths counted once), in list order."""
    first = {}
    for i, path in enumerate(pool.paths):
        first.setdefault(path, i)
    distinct = np.fromiter(first.values(), dtype=np.int64, count=len(first))
    if count > len(distinct):
        raise UnknownProtocolError(f"{what}: {count} seen-class items needed but the pool has {len(distinct)}; "
                                   "lower eval.gzs.fraction or use eval.gzs.source=train")
    keep = np.sort(distinct[rng.choice(len(distinct), count, replace=False)])
    return FileList([pool.paths[i] for i in keep], [pool.labels[i] for i in keep], f"{pool.source} (GZS sample of {count})")


def joined(seen: FileList, unseen: FileList, label_offset: int) -> FileList:
    """Seen items (labels shifted by `label_offset`, the number of unseen classes) followed by the unseen ones."""
    return FileList([*seen.paths, *unseen.paths], [label_offset + c for c in seen.labels] + list(unseen.labels),
                    f"{seen.source} + {unseen.source}")


class PhotoRetrievalProtocol(Protocol):
    """Photo-based image retrieval (PBIR) as SAKE reports it.

    SAKE (src/test_cse_resnet_sketchy_zeroshot.py, prepare_pbir_features, lines 139-163,
    applied at line 119 to the unseen-class photo gallery): the first `queries_per_class`
    (10) photos of every unseen class, in gallery-list order, are the queries; the remaining
    unseen-class photos are the gallery. Both sides are embedded as photos.
    """

    name = "pbir"
    result_key = "pbir"
    title = "photo-based image retrieval (unseen classes)"

    def task(self, data, split: str) -> RetrievalTask:
        self._only_test(split)
        per_class = int(self.settings.get("queries_per_class", 10))
        photos = data.zero_photo
        taken: dict[int, int] = {}
        is_query = []
        for label in photos.labels:
            taken[label] = taken.get(label, 0) + 1
            is_query.append(taken[label] <= per_class)
        is_query = np.asarray(is_query, dtype=bool)
        queries, gallery = (FileList([p for p, q in zip(photos.paths, is_query) if q == side],
                                     [c for c, q in zip(photos.labels, is_query) if q == side], f"{photos.source} ({what})")
                            for side, what in ((True, f"first {per_class} per class"), (False, "the rest")))
        bare = sorted(set(queries.labels) - set(gallery.labels))
        if bare:  # their queries have no relevant photo: no AP, left out of the means
            log.warning("pbir: %d of %d unseen classes have at most %d photos, so none is left in the gallery "
                        "(their queries are not scored); lower eval.pbir.queries_per_class", len(bare),
                        len(set(queries.labels)), per_class)
        return RetrievalTask(queries, "photo", gallery, "photo", data.unseen_classes)


class FineGrainedProtocol(Protocol):
    """Fine-grained (instance-level) ZS-SBIR: Pang et al., CVPR 2019, as Sketch_LVM (CVPR 2023) uses it.

    Every unseen-class sketch queries the unseen-class photos of a fine-grained dataset
    (`data.fine_grained`: photos with sketches, zsbir/data/instances.py); its one relevant
    photo is the one it was drawn from. Metrics acc@K (`eval.fg.ks`, default 1 and 5),
    `zsbir.eval.metrics.instance_accuracy`. `eval.fg.gallery`: `category` (the standard
    protocol: a query ranks the photos of its own category) or `all` (every unseen photo).
    Split `val`: the held-out seen-class sketches against the training photos they were drawn from.
    """

    name = "fg"
    result_key = "fg"
    headline_metric = "acc_1"
    title = "fine-grained (instance-level) retrieval, unseen classes"

    def metric_keys(self) -> list[str]:
        return [f"acc_{int(k)}" for k in self.settings.get("ks", (1, 5))]

    def task(self, data, split: str) -> RetrievalTask:
        from zsbir.data.instances import instance_photos

        if split == "test":
            return RetrievalTask(data.zero_sketch, "sketch", data.zero_photo, "photo", data.unseen_classes)
        if split == "val":
            photos = instance_photos(data.train_photo, data.val_sketch, None, "fg validation", warn_unsketched=False)
            return RetrievalTask(data.val_sketch, "sketch", photos, "photo", data.seen_classes)
        raise ValueError(f"protocol fg has splits 'test' and 'val', not {split!r}")

    def score(self, embeddings, eval_cfg, device, split: str = "evaluation", task: RetrievalTask | None = None) -> dict:
        from zsbir.data.filelist import DatasetError
        from zsbir.data.instances import instance_ids
        from zsbir.eval.metrics import instance_accuracy

        gallery = str(self.settings.get("gallery", "category"))
        if gallery not in FG_GALLERIES:
            raise UnknownProtocolError(f"eval.fg.gallery={gallery!r}: must be one of {'|'.join(FG_GALLERIES)}")
        try:
            query_instance, gallery_instance = instance_ids(task.queries, task.gallery)
        except DatasetError as err:
            raise UnknownProtocolError(f"protocol fg needs sketch-photo instance pairs ({err}); evaluate it on a "
                                       "fine-grained dataset: data=sketchy_fg or data=synthetic_fg") from None
        groups = (embeddings.query_labels, embeddings.gallery_labels) if gallery == "category" else (None, None)
        ks = [int(k) for k in self.settings.get("ks", (1, 5))]
        return instance_accuracy(embeddings.queries, query_instance, embeddings.gallery, gallery_instance, *groups,
                                 ks=ks, chunk_size=eval_cfg.get("chunk_size"), device=device)


PROTOCOLS: dict[str, type[Protocol]] = {
    cls.name: cls for cls in (ZeroShotProtocol, GeneralizedZeroShotProtocol, PhotoRetrievalProtocol,
                              FineGrainedProtocol)}
# The config schema validates eval.protocols against zsbir.choices.EVAL_PROTOCOLS (it imports no
# implementation module); a new protocol is named there too (tests/test_protocols.py checks).


def selected_protocols(eval_cfg, require_zs: bool = False) -> list[str]:
    """`eval.protocols` (default [zs]) without repeats; training puts zs first, since its `test`
    key is the run's headline result (report, untrained row, model selection's counterpart)."""
    names = list(dict.fromkeys(str(n) for n in (eval_cfg.get("protocols") or ["zs"])))
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise UnknownProtocolError(f"eval.protocols contains {unknown}: known protocols are {sorted(PROTOCOLS)}")
    if require_zs and "zs" not in names:
        names.insert(0, "zs")
    return names


def get_protocol(name: str, eval_cfg=None) -> Protocol:
    """The protocol `name`, with its settings from `eval_cfg[name]` when the eval config has them."""
    if name not in PROTOCOLS:
        raise UnknownProtocolError(f"unknown evaluation protocol {name!r} in eval.protocols; known: {sorted(PROTOCOLS)}")
    settings = eval_cfg.get(name) if eval_cfg is not None and hasattr(eval_cfg, "get") else None
    return PROTOCOLS[name](settings)
