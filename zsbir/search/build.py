"""Building and updating a run's photo index: `python -m zsbir.index` (zsbir/index.py).

Sources: a list of the run's benchmark (`source=zero_photo`, the unseen-class gallery, by
default; `data=<dataset>` for another benchmark) or a folder of the user's photos
(`images=<folder>`; the class of `<folder>/<class>/<photo>` is `<class>`). The index of a
source lives in `<run_dir>/index/<name>/`. Building again adds only the photos the index
does not hold yet; an index of another checkpoint or transform is refused (`rebuild=true`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from zsbir.search.model import RunModel, embed_files
from zsbir.search.store import (INDEX_FORMAT, IndexParams, SearchIndexError, SketchIndex, check_fresh, make_index,
                                measure_recall, open_index, stored_vectors)

log = logging.getLogger("zsbir.search")

SOURCES = ("zero_photo", "train_photo", "val_photo")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
INDEX_DIR = "index"


def folder_items(folder: Path) -> list[dict]:
    """Every image file under `folder` (by extension), sorted; class = the first sub-folder, if any."""
    if not folder.is_dir():
        raise SearchIndexError(f"images={folder} is not a folder; pass a folder of photos "
                               "(sub-folders named after classes are optional)")
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        rel = path.relative_to(folder)
        items.append({"path": rel.as_posix(), "class": rel.parts[0] if len(rel.parts) > 1 else None})
    if not items:
        raise SearchIndexError(f"images={folder} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return items


def benchmark_items(model: RunModel, data_cfg, source: str) -> tuple[Path, str, list[dict]]:
    """(dataset root, dataset name, items) of one list of a benchmark split, as the evaluator reads it."""
    from zsbir.data.datamodule import load_split

    if source not in SOURCES:
        raise SearchIndexError(f"source={source!r} is not one of {SOURCES} (zero_photo: the unseen-class gallery "
                               "the evaluator ranks); for your own photos pass images=<folder>")
    data = load_split(data_cfg, seed=int(model.run_cfg.seed))
    names = data.unseen_classes if source.startswith("zero") else data.seen_classes
    filelist = getattr(data, source)
    items = [{"path": p, "class": names[label] if 0 <= label < len(names) else str(label)}
             for p, label in zip(filelist.paths, filelist.labels)]
    return Path(data.root).resolve(), data.name, items


def default_name(source: str, images: str | None, dataset: str) -> str:
    if images:
        return f"images-{Path(images).expanduser().resolve().name}"
    return f"{dataset}-{source}"


def index_folder(run_dir: Path, name: str) -> Path:
    return run_dir / INDEX_DIR / name


def build_command(model: RunModel, source: str, images: str | None, name: str, default: str,
                  kind: str, data_name: str | None) -> str:
    parts = ["python -m zsbir.index", f"run_dir={model.run_dir}"]
    parts.append(f"images={Path(images).expanduser().resolve()}" if images else f"source={source}")
    if data_name:
        parts.append(f"data={data_name}")
    if model.checkpoint_label != "best":
        parts.append(f"ckpt={model.checkpoint}")
    if name != default:
        parts.append(f"name={name}")
    if kind != "exact":
        parts.append(f"index.kind={kind}")
    return " ".join(parts)


def build_index(model: RunModel, *, source: str = "zero_photo", images: str | None = None, data_cfg=None,
                data_name: str | None = None, name: str | None = None, params: IndexParams | None = None,
                rebuild: bool = False, batch_size: int | None = None, num_workers: int = 0,
                progress: bool = True) -> SketchIndex:
    """Build the index of a source, or bring an existing one up to date (embedding only new photos)."""
    params = params or IndexParams()
    params.check()
    if images:
        root = Path(images).expanduser().resolve()
        items, dataset = folder_items(root), None
    else:
        root, dataset, items = benchmark_items(model, data_cfg if data_cfg is not None else model.run_cfg.data, source)
    default = default_name(source, images, dataset or "")
    name = name or default
    folder = index_folder(model.run_dir, name)
    command = build_command(model, source, images, name, default, params.kind, data_name)
    transform = model.transform_fingerprint()
    batch_size = int(batch_size or model.run_cfg.data.get("eval_batch_size", 64))
    if rebuild or not (folder / "meta.json").is_file():
        params.check_gallery_size(len(items))  # before an embedding pass that would be thrown away

    existing = None
    if (folder / "meta.json").is_file() and not rebuild:
        existing = open_index(folder)
        check_fresh(existing, model.checkpoint_sha256, transform, str(model.checkpoint))
        if existing.meta["root"] != str(root) or existing.meta["kind"] != params.kind:
            raise SearchIndexError(
                f"index {folder} holds {existing.meta['kind']} vectors of {existing.meta['root']}, not "
                f"{params.kind} vectors of {root}; pass another name=<index name>, or replace it: {command} rebuild=true")

    known = {it["path"] for it in existing.items} if existing else set()
    if existing:
        gone = known - {it["path"] for it in items}
        if gone:
            log.warning("%d indexed photos are no longer in the source (first: %s); they stay searchable until "
                        "`%s rebuild=true`", len(gone), sorted(gone)[:3], command)
    todo = [it for it in items if it["path"] not in known]
    started = time.perf_counter()
    vectors, kept, failed = embed_files(model, [root / it["path"] for it in todo], batch_size, num_workers, progress)
    seconds = time.perf_counter() - started
    for position, error in failed:
        log.warning("skipped %s: cannot decode it (%s)", root / todo[position]["path"], error)
    added = [todo[i] for i in kept]

    if existing:
        store = existing
        if len(vectors):
            store.index.add(vectors)
        store.meta["items"] += added
        all_vectors = stored_vectors(store.index) if params.kind != "exact" else None
    else:
        store = SketchIndex(folder, make_index(params, vectors), {})
        store.meta = {"items": added}
        all_vectors = vectors
    store.meta.update({
        "format": INDEX_FORMAT,
        "kind": params.kind,
        "params": asdict(params),
        "dim": int(store.index.d),
        "count": len(store),
        "root": str(root),
        "source": {"images": str(root)} if images else {"dataset": dataset, "list": source},
        "run_dir": str(model.run_dir),
        "checkpoint": str(model.checkpoint),
        "checkpoint_sha256": model.checkpoint_sha256,
        "step": model.step,
        "model": model.run_cfg.model.get("name"),
        "transform": transform,
        "build_command": command,
        "skipped": [{"path": todo[p]["path"], "error": e} for p, e in failed],
        "last_update": {"embedded": len(added), "skipped": len(failed), "seconds": round(seconds, 3),
                        "images_per_s": round(len(added) / seconds, 1) if seconds > 0 and added else None},
    })
    if all_vectors is not None and (len(added) or not existing):
        store.meta["recall"] = measure_recall(store.index, params, all_vectors)
    store.save()
    log.info("index %s: %d photos (%d embedded now, %d skipped, %.1f s)%s", folder, len(store), len(added),
             len(failed), seconds,
             f"; recall@10 against exact search: {store.meta['recall']['value']:.4f}" if store.meta.get("recall") else "")
    return store


def find_index(model: RunModel, name: str | None = None) -> SketchIndex:
    """The run's index to search: `name` (an index name or a folder), else the default source's
    index, else the only one; the default one is built when the run has none."""
    base = model.run_dir / INDEX_DIR
    if name:
        folder = Path(name).expanduser()
        folder = folder if (folder / "meta.json").is_file() else base / name
        if not (folder / "meta.json").is_file():
            present = sorted(p.parent.name for p in base.glob("*/meta.json"))
            raise SearchIndexError(f"no index named {name!r} in {base} (present: {present or 'none'}); build it with "
                                   f"`python -m zsbir.index run_dir={model.run_dir} name={name} ...`")
    else:
        present = sorted(p.parent for p in base.glob("*/meta.json"))
        default = base / f"{model.run_cfg.data.name}-zero_photo"
        if default in present:
            folder = default
        elif len(present) == 1:
            folder = present[0]
        elif present:
            raise SearchIndexError(f"{base} holds several indexes ({[p.name for p in present]}); "
                                   "pick one with index=<name>")
        else:
            log.info("the run has no index yet: building the unseen-class gallery index (python -m zsbir.index)")
            return build_index(model, progress=False)
    store = open_index(folder)
    check_fresh(store, model.checkpoint_sha256, model.transform_fingerprint(), str(model.checkpoint))
    return store


def params_from_cfg(index_cfg) -> IndexParams:
    values = OmegaConf.to_container(index_cfg, resolve=True) if index_cfg is not None else {}
    unknown = set(values) - set(IndexParams.__dataclass_fields__)
    if unknown:
        raise SearchIndexError(f"unknown index settings {sorted(unknown)}; known: {sorted(IndexParams.__dataclass_fields__)}")
    return IndexParams(**values)

