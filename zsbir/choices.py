"""Values the config schema (zsbir/config.py) and the implementations share.

Kept apart so that validating a config imports no implementation module (no
torchvision, no torch optimizers, no image generator).
"""
from __future__ import annotations

from dataclasses import dataclass

AUGMENT_RECIPES = ("none", "flip", "sake", "dsn", "clip")  # data.augment (CPU transforms and GPU augmentation)
LR_SCHEDULES = ("constant", "cosine", "exp")  # sched.name
ENCODE_MODES = ("joint", "per_domain")  # model.encode: one encoder call per step, or one per domain
EVAL_PROTOCOLS = ("zs", "gzs", "pbir", "fg")  # eval.protocols: the registry of zsbir/eval/protocols.py
GZS_SOURCES = ("train", "val")  # eval.gzs.source: where GZS's seen-class items come from
RERANK_MODES = ("exhaustive", "top_n")  # eval.rerank.mode (null: off): zsbir/eval/rerank.py
FG_GALLERIES = ("category", "all")  # eval.fg.gallery: a query ranks its own category's photos, or every photo


def metric_names(map_at, prec_at) -> list[str]:
    """The metric keys the evaluator reports for eval.map_at / eval.prec_at, in table column order."""
    return ["map_all"] + [f"map_{k}" for k in map_at] + [f"prec_{k}" for k in prec_at]


@dataclass(frozen=True)
class SyntheticSpec:
    """data.synthetic: the generated benchmark's size (zsbir/data/synthetic.py draws it)."""

    seed: int = 0
    seen_classes: int = 60
    unseen_classes: int = 15
    sketches_per_class: int = 24  # train sketches per seen class / zero-shot sketches per unseen class
    photos_per_class: int = 24
    val_sketches_per_class: int = 6  # held-out sketches of seen classes, for model selection
    image_size: int = 64


@dataclass(frozen=True)
class SyntheticFgSpec:
    """data.synthetic_fg: the generated fine-grained benchmark (zsbir/data/synthetic_fg.py draws it).

    Every photo is its own instance; each of its sketches is drawn from it.
    """

    seed: int = 0
    seen_classes: int = 40
    unseen_classes: int = 10
    photos_per_class: int = 12  # instances per class
    sketches_per_photo: int = 2  # training / test sketches of each photo
    val_sketches_per_photo: int = 1  # extra sketches of each seen-class photo, for model selection
    image_size: int = 64
