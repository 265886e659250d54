"""Evaluation protocols: which items are queries and gallery, in which domains, and how they are scored.

A protocol is the only thing a new evaluation setting adds (generalized zero-shot,
photo-to-photo, fine-grained): it names its query and gallery lists for a split and
their domains, scores the embeddings (relevance: same class, unless it overrides
`score`) and writes its metrics under its own key of metrics.json (`result_key`). The
`Evaluator` (zsbir/eval/evaluator.py) does the rest: loaders, embedding, precision,
grids, tables and JSON. Register a protocol in `PROTOCOLS`; `eval.protocols` will
select among them (today every run evaluates `zs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zsbir.errors import ZsbirError

# Metrics every results table shows, after the dataset's own (data.metrics).
DEFAULT_METRICS = ["map_all", "prec_100", "map_200", "prec_200"]


class UnknownProtocolError(ZsbirError):
    """An evaluation protocol name that is not registered."""


@dataclass(frozen=True)
class RetrievalTask:
    """Query and gallery lists of one protocol on one split, with their domains and class names."""

    queries: object  # FileList
    query_domain: str
    gallery: object  # FileList
    gallery_domain: str
    class_names: list[str]


class Protocol:
    """Base class: subclasses set `name`, `result_key` and implement `task`."""

    name: ClassVar[str]
    result_key: ClassVar[str]  # the key of metrics.json (and eval_metrics.json) its test metrics go under
    title: ClassVar[str]  # first line of its results table

    def task(self, data, split: str) -> RetrievalTask:  # pragma: no cover
        raise NotImplementedError

    def score(self, embeddings, eval_cfg, device, split: str = "evaluation") -> dict:
        """Metrics of the embeddings; relevance = same class label. `split` names them in errors."""
        from zsbir.eval.retrieval import score_embeddings

        return score_embeddings(embeddings, eval_cfg, device, split)


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


PROTOCOLS: dict[str, type[Protocol]] = {cls.name: cls for cls in (ZeroShotProtocol,)}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UnknownProtocolError(f"unknown evaluation protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]()
