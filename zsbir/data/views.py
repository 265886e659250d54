"""The batch views: every image a training batch can hold, with its domain and keys.

A triplet item (zsbir/data/pairs.py, `data.sampler: triplets`) is a sketch, a positive
photo of its class and a negative photo of another class, plus optional second augmented
views. A two-stream batch (zsbir/data/streams.py, `data.sampler: streams`) holds a sketch
batch and an independent photo batch, each with its own labels and list indices, plus
optional extra augmentations of each. Everything that
needs a view's domain, its class-label key or its index key reads it here, never from
the view's spelling.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class View:
    name: str
    domain: str  # "sketch" | "photo": the encoder branch and augmentation it gets
    label_key: str  # batch key of its class labels
    index_key: str  # batch key of its items' indices in the training list of its domain


# In the order the trainer encodes them.
VIEWS: dict[str, View] = {view.name: view for view in (
    View("sketch", "sketch", "label", "index"),
    View("photo_pos", "photo", "label", "pos_index"),
    View("photo_neg", "photo", "neg_label", "neg_index"),
    View("sketch_v2", "sketch", "label", "index"),  # a second augmentation of the same sketch
    View("photo_pos_v2", "photo", "label", "pos_index"),  # a second augmentation of the same positive photo
    # two-stream batches (data.sampler=streams)
    View("photo", "photo", "photo_label", "photo_index"),
    View("sketch_v3", "sketch", "label", "index"),
    View("photo_v2", "photo", "photo_label", "photo_index"),
    View("photo_v3", "photo", "photo_label", "photo_index"),
)}
TRIPLET_VIEWS = ("sketch", "photo_pos", "photo_neg", "sketch_v2", "photo_pos_v2")  # views of triplet items
STREAM_VIEWS = ("sketch", "sketch_v2", "sketch_v3", "photo", "photo_v2", "photo_v3")  # views of two-stream batches
SKETCH_VIEWS = tuple(name for name, view in VIEWS.items() if view.domain == "sketch")
PHOTO_VIEWS = tuple(name for name, view in VIEWS.items() if view.domain == "photo")


def view(name: str) -> View:
    if name not in VIEWS:
        raise ValueError(f"unknown batch view {name!r}; known: {list(VIEWS)}")
    return VIEWS[name]


def domain_of(name: str) -> str:
    return view(name).domain


def in_order(names) -> tuple[str, ...]:
    """`names` (validated) in the registry's order."""
    wanted = set(names)
    unknown = wanted - set(VIEWS)
    if unknown:
        raise ValueError(f"unknown batch views {sorted(unknown)}; known: {list(VIEWS)}")
    return tuple(name for name in VIEWS if name in wanted)
