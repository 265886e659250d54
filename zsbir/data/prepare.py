"""Prepare a benchmark: `python -m zsbir.data.prepare data=<name> [key=value ...]`.

Steps, each skipped when already done:
1. download `data.download.url` (when the split folder is absent) and extract it; without
   network this fails within `timeout_s` with manual instructions (URL, expected layout);
2. write train lists that are not public (built from the seen-class folders) into the
   split folder, so runs read them instead of listing folders;
3. `verify=true`: decode every listed image and record unreadable ones in
   `<split>/zsbir_unreadable.txt` (strict runs then fail on them, `data.strict=false` skips them);
4. `cache=true`: write the pre-resized image cache (imagecache.py; includes step 3);
5. load the split as a run would: counts, missing files; print the counts.

Examples:
    python -m zsbir.data.prepare data=sketchy paths.data_dir=/datasets
    python -m zsbir.data.prepare data=tuberlin cache=true workers=16
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from omegaconf import DictConfig

from zsbir.data.datamodule import (LIST_KEYS, UNREADABLE_RECORD, dataset_root, domain_of, load_split, read_lists,
                                   split_folder)
from zsbir.data.filelist import DatasetError, FileList
from zsbir.data.imagecache import build_image_cache, decode_all
from zsbir.errors import run_cli

log = logging.getLogger("zsbir.prepare")


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose, initialize_config_dir

    from zsbir._paths import config_dir
    from zsbir.config import refuse_renamed_keys

    refuse_renamed_keys(overrides)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="prepare", overrides=overrides)


def expected_layout(data_cfg, root: Path) -> str:
    split = root / str(data_cfg.split_dir)
    folders = data_cfg.get("folders") or {}
    lines = [f"  {split}/cname_cid.txt, cname_cid_zero.txt"]
    for key in LIST_KEYS:
        name = data_cfg.lists.get(key)
        if name:
            built = f"   (optional: built from {root}/{folders[key]}/<class>/ when absent)" if key in folders else ""
            lines.append(f"  {split}/{name}{built}")
    lines.append(f"  {root}/<image folders named in the lists; list paths are relative to {root}>")
    for key, folder in folders.items():
        lines.append(f"  {root}/{folder}/<seen class name as in cname_cid.txt>/*.{'|'.join(data_cfg.folder_extensions)}")
    return "\n".join(lines)


def manual_instructions(data_cfg, root: Path, reason: str) -> str:
    download = data_cfg.get("download") or {}
    url, notes = download.get("url"), download.get("notes")
    where = f"download {url}" if url else "obtain the dataset"
    return (
        f"{reason}\nTo prepare '{data_cfg.name}' by hand:\n"
        f"1. on a machine with internet access, {where}" + (f" ({notes})" if notes else "") + "\n"
        f"2. extract it so that this layout exists (docs/datasets.md):\n{expected_layout(data_cfg, root)}\n"
        f"3. re-run `python -m zsbir.data.prepare data={data_cfg.name} data.root={root}` to verify it"
    )


def fetch(url: str, target: Path, timeout_s: float) -> None:
    """Download `url` to `target` (via a temporary file): one try, `timeout_s` per network wait."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    log.info("downloading %s to %s", url, target)
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)
    os.replace(partial, target)


def install_from_archive(archive: Path, data_cfg, root: Path) -> None:
    """Extract `archive` next to `root` and move every dataset folder it holds into place.

    A dataset folder is recognised by `<folder>/<split dir>/cname_cid.txt`; the one whose
    split dir holds this config's zero-shot list becomes `root`, others (SAKE's archive
    carries Sketchy and TU-Berlin) move next to it under their own names.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".zsbir-extract-") as tmp:
        log.info("extracting %s", archive)
        try:
            shutil.unpack_archive(str(archive), tmp)
        except (shutil.ReadError, ValueError, OSError) as err:
            raise DatasetError(manual_instructions(data_cfg, root, f"cannot extract {archive}: {err}")) from err
        found = sorted({p.parent.parent for p in Path(tmp).rglob("cname_cid.txt") if len(p.relative_to(tmp).parts) <= 5})
        split_dir, zero_list = str(data_cfg.split_dir), str(data_cfg.lists.zero_sketch)
        ours = [d for d in found if (d / split_dir / zero_list).is_file()]
        if not ours:
            raise DatasetError(manual_instructions(
                data_cfg, root, f"{archive} holds no folder with {split_dir}/{zero_list} "
                                f"(dataset folders found: {[str(d.relative_to(tmp)) for d in found]})"))
        for folder in found:
            destination = root if folder == ours[0] else root.parent / folder.name
            if destination.exists():
                log.info("keeping the existing %s (the archive's %s is not moved)", destination, folder.name)
                continue
            shutil.move(str(folder), destination)
            log.info("installed %s", destination)


def ensure_downloaded(cfg: DictConfig) -> None:
    data_cfg = cfg.data
    root = dataset_root(data_cfg)
    if (root / str(data_cfg.split_dir)).is_dir():
        return
    url = (data_cfg.get("download") or {}).get("url")
    if not url or not cfg.download:
        why = "no public download URL is known" if not url else "download=false"
        raise DatasetError(manual_instructions(data_cfg, root, f"dataset split folder not found: "
                                                               f"{root / str(data_cfg.split_dir)} ({why})."))
    archive = Path(str(cfg.paths.cache_dir)).expanduser() / "downloads" / Path(url.split("?")[0]).name
    if not archive.is_file():
        try:
            fetch(url, archive, float(cfg.timeout_s))
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise DatasetError(manual_instructions(
                data_cfg, root, f"cannot download {url}: {reason} (no internet access here?).")) from None
    install_from_archive(archive, data_cfg, root)


def write_built_lists(data_cfg, root: Path, split: Path, lists: dict[str, FileList]) -> None:
    for key, folder in (data_cfg.get("folders") or {}).items():
        target = split / str(data_cfg.lists[key])
        if target.is_file() or key not in lists:
            continue
        filelist = lists[key]
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text("".join(f"{p} {label}\n" for p, label in zip(filelist.paths, filelist.labels)), encoding="utf-8")
        os.replace(tmp, target)
        log.info("wrote %s: %d images of %s/<class>/ (the list is not public; runs now read this file)",
                 target, len(filelist), root / str(folder))


def write_unreadable_record(split: Path, unreadable: list[str]) -> None:
    record = split / UNREADABLE_RECORD
    if unreadable:
        record.write_text("".join(f"{p}\n" for p in sorted(set(unreadable))), encoding="utf-8")
        log.warning("%d listed images cannot be decoded; recorded in %s (first: %s). Strict runs stop on them; "
                    "data.strict=false skips them", len(set(unreadable)), record, sorted(set(unreadable))[:3])
    else:
        record.unlink(missing_ok=True)
        log.info("every listed image decodes")


def image_cache_folder(cfg: DictConfig) -> Path:
    if cfg.get("cache_folder"):
        return Path(str(cfg.cache_folder)).expanduser()
    if cfg.data.get("preresized_folder"):
        return Path(str(cfg.data.preresized_folder)).expanduser()
    return Path(str(cfg.paths.cache_dir)).expanduser() / "images" / f"{cfg.data.name}-{int(cfg.cache_size)}px"


def prepare(cfg: DictConfig) -> dict:
    """Run every step for `cfg.data`; returns the verified counts (and the cache folder, if built)."""
    data_cfg = cfg.data
    ensure_downloaded(cfg)
    root, split = split_folder(data_cfg)
    _, _, lists = read_lists(data_cfg, root, split)
    write_built_lists(data_cfg, root, split, lists)
    result: dict = {}
    if cfg.cache:
        folder = image_cache_folder(cfg)
        by_key = {key: (filelist, domain_of(key)) for key, filelist in lists.items()}
        unreadable = build_image_cache(root, by_key, folder, int(cfg.cache_size), int(cfg.workers))
        write_unreadable_record(split, [p for paths in unreadable.values() for p in paths])
        result["preresized_folder"] = str(folder)
    elif cfg.verify:
        unreadable = []
        for key, filelist in lists.items():
            log.info("decoding %d %s images", len(filelist), key)
            bad = decode_all(root, filelist.paths, domain_of(key), 8, int(cfg.workers))
            unreadable += [filelist.paths[i] for i in bad]
        write_unreadable_record(split, unreadable)
    data = load_split(data_cfg, seed=int(cfg.seed))
    result["counts"] = data.counts()
    log.info("dataset '%s' at %s is ready: %s", data.name, root, result["counts"])
    if "preresized_folder" in result:
        log.info("image cache written; use it with: data.preresized_folder=%s", result["preresized_folder"])
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    return run_cli(lambda: prepare(compose(list(sys.argv[1:] if argv is None else argv))), log)


if __name__ == "__main__":
    sys.exit(main())
