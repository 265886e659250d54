"""Cross-dataset evaluation: a run trained on one benchmark, tested on another's unseen classes.

Benchmarks share class names (Sketchy's `airplane` is also a TU-Berlin class), so a test
class the model was trained on is not zero-shot. `eval.exclude_train_classes: true` drops
the test classes whose normalised name equals a training class of the run.
"""
from __future__ import annotations

import dataclasses
import re

from zsbir.data.filelist import FileList
from zsbir.errors import ZsbirError


class CrossDatasetError(ZsbirError):
    """Excluding the run's training classes leaves nothing to evaluate."""


def normalised_class_name(name: str) -> str:
    """Case, spaces, hyphens and underscores do not distinguish classes: `Teddy-Bear` == `teddy_bear`."""
    return re.sub(r"[\s_-]+", "", name).lower()


def training_class_names(run_data_cfg) -> list[str]:
    """The seen (training) classes of a run, read from its dataset's split folder."""
    from zsbir.data.datamodule import split_folder
    from zsbir.data.filelist import read_class_file

    _, split = split_folder(run_data_cfg)
    return read_class_file(split / "cname_cid.txt")


def drop_training_classes(data, training_classes: list[str]):
    """(data without the unseen-class items whose class a training class names, the dropped class names).

    Labels are kept (they still index `data.unseen_classes`); only the test lists shrink.
    """
    trained = {normalised_class_name(c) for c in training_classes}
    dropped_ids = {i for i, c in enumerate(data.unseen_classes) if normalised_class_name(c) in trained}
    dropped = [data.unseen_classes[i] for i in sorted(dropped_ids)]
    if len(dropped_ids) == len(data.unseen_classes):
        raise CrossDatasetError(f"every unseen class of '{data.name}' is also a training class of the run "
                                f"({len(dropped)} classes); evaluate another dataset or set eval.exclude_train_classes=false")

    def kept(items: FileList) -> FileList:
        keep = [i for i, label in enumerate(items.labels) if label not in dropped_ids]
        return FileList([items.paths[i] for i in keep], [items.labels[i] for i in keep],
                        f"{items.source} (without {len(dropped)} training classes)")

    return dataclasses.replace(data, zero_sketch=kept(data.zero_sketch), zero_photo=kept(data.zero_photo)), dropped
