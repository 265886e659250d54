"""Reading benchmark split folders: class files and `<relative path> <label>` file lists.

Layout (../shared/docs/datasets.md): `<root>/<split_dir>/cname_cid.txt` (seen classes),
`cname_cid_zero.txt` (unseen classes, re-indexed from 0) and file lists whose lines are
`<path relative to root> <label>`; the label is the LAST whitespace token and the path is
everything before it (TU-Berlin class folders contain spaces).
"""
from __future__ import annotations

from zsbir.errors import ZsbirError

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class DatasetError(ZsbirError):
    """A dataset folder, list or image is missing or inconsistent; the message says how to fix it."""


@dataclass
class FileList:
    """Items of one list: paths relative to the dataset root, integer labels, and where they came from."""

    paths: list[str]
    labels: list[int]
    source: str  # the list file (or "built from folders: ...")
    line_numbers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def parse_line(line: str, where: str) -> tuple[str, int]:
    parts = line.rstrip("\r\n").rsplit(maxsplit=1)
    if len(parts) != 2:
        raise DatasetError(f"{where}: expected '<relative path> <label>', got {line.strip()!r}")
    path, label = parts
    try:
        return path.strip(), int(label)
    except ValueError:
        raise DatasetError(f"{where}: the last token must be an integer label, got {label!r}") from None


def text_lines(path: Path, skip_undecodable: bool = False):
    """(line number, text) of a UTF-8 list file; a line that is not UTF-8 is a DatasetError naming the
    file and line, or (`skip_undecodable`, data.strict=false) skipped with a warning giving the count."""
    skipped = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                if not skip_undecodable:
                    raise DatasetError(
                        f"{path}, line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}). "
                        "Re-save the list as UTF-8 or remove that line; data.strict=false skips such lines"
                    ) from None
                skipped.append(number)
    if skipped:
        log.warning("data.strict=false: skipping %d line(s) of %s that are not UTF-8 text (lines %s)", len(skipped),
                    path, skipped[:10])


def read_filelist(path: str | Path, strict: bool = True) -> FileList:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"file list not found: {path}. Check data.root, data.split_dir and data.lists, or prepare the "
            "dataset again (an incomplete download lacks some lists)"
        )
    paths, labels, lines = [], [], []
    for number, line in text_lines(path, skip_undecodable=not strict):
        if not line.strip():
            continue
        rel, label = parse_line(line, f"{path}:{number}")
        paths.append(rel)
        labels.append(label)
        lines.append(number)
    return FileList(paths, labels, str(path), lines)


def read_class_file(path: str | Path) -> list[str]:
    """Class names ordered by id from a `<class name> <id>` file; ids must be 0..n-1."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"class file not found: {path}")
    by_id: dict[int, str] = {}
    for number, line in text_lines(path):
        if line.strip():
            name, cid = parse_line(line, f"{path}:{number}")
            if cid in by_id:
                raise DatasetError(f"{path}:{number}: class id {cid} appears twice")
            by_id[cid] = name
    if sorted(by_id) != list(range(len(by_id))):
        raise DatasetError(f"{path}: class ids must be 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))]


def check_labels(filelist: FileList, num_classes: int, class_file: str) -> None:
    bad = [(p, l) for p, l in zip(filelist.paths, filelist.labels) if not 0 <= l < num_classes]
    if bad:
        raise DatasetError(
            f"{filelist.source}: {len(bad)} labels outside 0..{num_classes - 1} of {class_file} "
            f"(first: {bad[0]}); was the list paired with the wrong class file?"
        )


def build_filelist_from_folders(root: Path, folder: str, classes: list[str], extensions: list[str],
                                fix: str) -> FileList:
    """A file list of every image in `<root>/<folder>/<class name>/`, labelled by class index.

    For train lists that are not public (TU-Berlin photos, QuickDraw sketches and photos).
    Order is deterministic: classes in id order, file names sorted. A missing or empty class
    folder is an error in any mode: the benchmark's class set would silently change.
    """
    base = Path(root) / folder
    wanted = {e.lower().lstrip(".") for e in extensions}
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        class_dir = base / name
        try:
            names = sorted(entry.name for entry in os.scandir(class_dir)
                           if entry.is_file() and entry.name.rsplit(".", 1)[-1].lower() in wanted)
        except FileNotFoundError:
            names = []
        if not names:
            empty.append(str(class_dir))
            continue
        paths += [f"{folder}/{name}/{file}" for file in names]
        labels += [label] * len(names)
    if empty:
        raise DatasetError(
            f"cannot build a train list from {base}: {len(empty)} of {len(classes)} seen-class folders are missing "
            f"or hold no {'/'.join(sorted(wanted))} images (first: {', '.join(empty[:3])}). {fix}"
        )
    return FileList(paths, labels, f"built from folders {base}/<class>/")


def find_missing(root: Path, filelist: FileList, listings: dict[str, set[str]] | None = None) -> list[int]:
    """Indices of items whose file does not exist under `root`.

    One directory listing per folder instead of one stat per file: a few hundred listings
    cover the half-million files of QuickDraw, also on network file systems. Pass the same
    `listings` dict for several lists to share them.
    """
    listings = {} if listings is None else listings
    missing = []
    for index, rel in enumerate(filelist.paths):
        folder, _, name = rel.rpartition("/")
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(Path(root) / folder))
            except (FileNotFoundError, NotADirectoryError):
                listings[folder] = set()
        if name not in listings[folder]:
            missing.append(index)
    return missing
