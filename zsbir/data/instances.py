"""Sketch-photo instance pairs for fine-grained ZS-SBIR (`data.fine_grained`).

Pairing rule (Sketchy's file names, which data=synthetic_fg copies): a sketch
`.../sketch/<folder>/<class>/<photo stem>-<n>.<ext>` was drawn from the photo
`.../photo/<folder>/<class>/<photo stem>.<ext>`, e.g. `bat/n02139199_11487-4.png` from
`bat/n02139199_11487.jpg`. A pair shares the class folder and the stem without its
`-<n>` suffix. Only photos under `data.fine_grained.photo_folder` take part: Sketchy's
`EXTEND_image_sketchy_ready` photos have no sketches and are not in the fine-grained
gallery, and a photo no sketch was drawn from is left out (logged).
"""
from __future__ import annotations

import logging
import re
from pathlib import PurePosixPath

import numpy as np

from zsbir.data.filelist import DatasetError, FileList

log = logging.getLogger(__name__)

SKETCH_NUMBER = re.compile(r"-\d+$")  # the n-th sketch of a photo: `<photo stem>-<n>`
PAIRING_RULE = "sketch <class>/<stem>-<n>.* was drawn from photo <class>/<stem>.*"


def photo_key(path: str) -> tuple[str, str]:
    """(class folder, file stem) of a photo."""
    p = PurePosixPath(path)
    return p.parent.name, p.stem


def sketch_key(path: str) -> tuple[str, str]:
    """(class folder, stem of the photo it was drawn from) of a sketch."""
    p = PurePosixPath(path)
    return p.parent.name, SKETCH_NUMBER.sub("", p.stem)


def sketch_photo_index(sketches: FileList, photos: FileList) -> np.ndarray:
    """For every sketch, the index of its photo in `photos`; a clear error when one has none."""
    index: dict[tuple[str, str], int] = {}
    for i, path in enumerate(photos.paths):
        if index.setdefault(photo_key(path), i) != i:
            raise DatasetError(f"{photos.source} names the photo {path} twice (or two photos share its class and "
                               "stem): a fine-grained gallery holds each photo once")
    matched = np.array([index.get(sketch_key(p), -1) for p in sketches.paths], dtype=np.int64)
    orphans = np.flatnonzero(matched < 0)
    if len(orphans):
        first = [sketches.paths[i] for i in orphans[:3]]
        raise DatasetError(f"{len(orphans)} of {len(sketches)} sketches of {sketches.source} have no photo in "
                           f"{photos.source} under the pairing rule ({PAIRING_RULE}); first: {first}. Check "
                           "data.fine_grained.photo_folder and that both lists come from the same split")
    wrong = np.flatnonzero(np.asarray(photos.labels)[matched] != np.asarray(sketches.labels))
    if len(wrong):
        raise DatasetError(f"{len(wrong)} sketches of {sketches.source} carry another class label than their photo "
                           f"(first: {sketches.paths[wrong[0]]}); the lists disagree")
    return matched


def instance_photos(photos: FileList, sketches: FileList, photo_folder: str | None, what: str,
                    warn_unsketched: bool = True) -> FileList:
    """The photos of `photos` under `photo_folder` (None: anywhere) that a sketch of `sketches` was
    drawn from, once each. Logs how many photos the rule leaves out and why (outside the folder, no sketch).
    """
    marker = f"/{photo_folder.strip('/')}/" if photo_folder else "/"
    drawn = {sketch_key(p) for p in sketches.paths}
    keep, outside, unsketched, seen = [], 0, 0, set()
    for i, path in enumerate(photos.paths):
        key = photo_key(path)
        if marker not in f"/{path}":
            outside += 1
        elif key not in drawn:
            unsketched += 1
        elif key not in seen:
            seen.add(key)
            keep.append(i)
    log.info("%s fine-grained gallery: %d of %d photos (%s); left out: %d outside %s (no sketches), "
             "%d without a sketch, %d repeated", what, len(keep), len(photos), PAIRING_RULE, outside, marker,
             unsketched, len(photos) - len(keep) - outside - unsketched)
    if unsketched and warn_unsketched:
        log.warning("%s: %d photos under %s have no sketch and are not in the fine-grained gallery",
                    what, unsketched, marker)
    lines = [photos.line_numbers[i] for i in keep] if photos.line_numbers else []
    return FileList([photos.paths[i] for i in keep], [photos.labels[i] for i in keep],
                    f"{photos.source} (fine-grained: photos with sketches)", lines)


def paired_subset(sketches: FileList, photos: FileList, cap: int | None, seed: int) -> FileList:
    """The sketches whose photo is in `photos` (after a debug cap dropped some), at most `cap` per class."""
    keys = {photo_key(p) for p in photos.paths}
    keep = [i for i, p in enumerate(sketches.paths) if sketch_key(p) in keys]
    if cap:
        rng = np.random.default_rng(seed)
        labels = np.asarray(sketches.labels)[keep]
        keep = sorted(int(np.asarray(keep)[j]) for c in np.unique(labels)
                      for j in rng.permutation(np.flatnonzero(labels == c))[:cap])
    lines = [sketches.line_numbers[i] for i in keep] if sketches.line_numbers else []
    return FileList([sketches.paths[i] for i in keep], [sketches.labels[i] for i in keep], sketches.source, lines)


def check_instance_counts(name: str, actual: dict[str, int], expected) -> None:
    """`data.fine_grained.counts` (photos with sketches per list) against what the pairing found."""
    wrong = {k: (int(v), actual[k]) for k, v in (expected or {}).items() if v is not None and actual.get(k) != int(v)}
    if wrong:
        detail = ", ".join(f"{k}: expected {e}, found {a}" for k, (e, a) in wrong.items())
        raise DatasetError(f"dataset '{name}': unexpected fine-grained photo counts ({detail}); the lists or "
                           "data.fine_grained.photo_folder do not match the pairing rule")


def instance_ids(sketches: FileList, photos: FileList) -> tuple[np.ndarray, np.ndarray]:
    """(query instance ids, gallery instance ids): a sketch's id is its photo's index in `photos`."""
    return sketch_photo_index(sketches, photos), np.arange(len(photos), dtype=np.int64)


def restrict_to_instances(lists: dict[str, FileList], fine_grained, name: str) -> dict[str, FileList]:
    """The split's lists for fine-grained training and testing: photo lists keep the photos with
    sketches (under `fine_grained.photo_folder`); every sketch must pair with one of them."""
    out = dict(lists)
    folder = str(fine_grained.get("photo_folder") or "photo")
    for photo_key_, sketch_keys in (("train_photo", ("train_sketch", "val_sketch")), ("zero_photo", ("zero_sketch",))):
        if photo_key_ not in lists:
            continue
        sketches = [lists[k] for k in sketch_keys if k in lists]
        drawn = FileList([p for s in sketches for p in s.paths], [c for s in sketches for c in s.labels],
                         " + ".join(s.source for s in sketches))
        out[photo_key_] = instance_photos(lists[photo_key_], drawn, folder, photo_key_)
        for key in sketch_keys:
            if key in lists:
                sketch_photo_index(lists[key], out[photo_key_])  # raises on a sketch without its photo
    check_instance_counts(name, {k: len(out[k]) for k in ("train_photo", "zero_photo") if k in out},
                          fine_grained.get("counts"))
    return out
