"""`python -m zsbir.data.prepare`: download and install, offline failure, built lists, verify, image cache."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datatree import build_tree
from zsbir.data.datamodule import UNREADABLE_RECORD, eval_loader, load_split
from zsbir.data.filelist import DatasetError, read_filelist
from zsbir.data.prepare import compose, main, prepare


def prepare_cfg(tmp_path: Path, dataset: str, data_dir: Path, *overrides: str):
    """The prepare config for a tiny tree: its own counts, no workers, the cache under tmp_path."""
    return compose([f"data={dataset}", f"paths.data_dir={data_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
                    "data.counts=null", "data.num_workers=0", "workers=1", *overrides])


def test_offline_download_fails_fast_with_manual_instructions(tmp_path, caplog):
    start = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="zsbir.prepare"):
        code = main([f"paths.data_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", "data=sketchy",
                     "data.download.url=http://127.0.0.1:9/dataset.zip", "timeout_s=2"])
    assert code == 1 and time.monotonic() - start < 10
    message = caplog.records[-1].getMessage()
    assert "cannot download http://127.0.0.1:9/dataset.zip" in message
    assert f"{tmp_path}/Sketchy/zeroshot1/sketch_tx_000000000000_ready_filelist_zero.txt" in message  # the layout
    assert "python -m zsbir.data.prepare data=sketchy" in message
    assert caplog.records[-1].exc_info is None  # a message, not a traceback
    assert not (tmp_path / "cache" / "downloads" / "dataset.zip").exists()


def test_dataset_without_public_url_explains_where_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)no public download URL.*ZSE-SBIR.*QuickDraw/images/<seen class name"):
        prepare(prepare_cfg(tmp_path, "quickdraw", tmp_path / "data"))


def test_download_extract_and_verify_from_an_archive(shared_splits, tmp_path):
    # SAKE's archive layout: one folder per dataset, each with its split folders and images.
    source = tmp_path / "src" / "dataset"
    build_tree(shared_splits, source, "sketchy")
    build_tree(shared_splits, source, "tuberlin")
    archive = shutil.make_archive(str(tmp_path / "dataset"), "zip", tmp_path / "src")
    data_dir = tmp_path / "data"
    result = prepare(prepare_cfg(tmp_path, "sketchy", data_dir, f"data.download.url=file://{archive}"))
    assert result["counts"]["zero_photo"] == len(read_filelist(source / "Sketchy/zeroshot1/all_photo_filelist_zero.txt"))
    assert (data_dir / "Sketchy" / "zeroshot1" / "cname_cid.txt").is_file()
    assert (data_dir / "TUBerlin" / "zeroshot" / "cname_cid.txt").is_file()  # the archive's other dataset
    assert (tmp_path / "cache" / "downloads" / "dataset.zip").is_file()
    assert not list(data_dir.glob(".zsbir-extract-*"))

    # TU-Berlin is now in place: no download; its photo train list is written once.
    prepare(prepare_cfg(tmp_path, "tuberlin", data_dir, "data.download.url=http://127.0.0.1:9/never-used.zip"))
    built = read_filelist(data_dir / "TUBerlin" / "zeroshot" / "ImageResized_ready_filelist_train.txt")
    assert len(built) == 220 * 3 and built.paths[0].startswith("ImageResized_ready/")


def test_written_train_lists_are_read_back_instead_of_rebuilt(shared_splits, tmp_path, caplog):
    build_tree(shared_splits, tmp_path / "data", "quickdraw")
    cfg = prepare_cfg(tmp_path, "quickdraw", tmp_path / "data")
    built = load_split(cfg.data)
    prepare(cfg)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="zsbir.data.datamodule"):
        again = load_split(cfg.data)
    assert not [r for r in caplog.records if "built it from" in r.getMessage()]
    assert again.train_photo.paths == built.train_photo.paths and again.train_photo.labels == built.train_photo.labels
    assert again.train_sketch.paths == built.train_sketch.paths  # same held-out split from the same seed


def test_verify_records_corrupt_images_then_strict_fails_and_lenient_skips(shared_splits, tmp_path, caplog):
    root = build_tree(shared_splits, tmp_path / "data", "quickdraw")
    corrupt = read_filelist(root / "zeroshot" / "sketch_zero.txt").paths[2]
    (root / corrupt).write_bytes(b"\x89PNG truncated")
    with caplog.at_level(logging.WARNING, logger="zsbir.prepare"):
        with pytest.raises(DatasetError, match=rf"1 listed image is missing or unreadable .*{UNREADABLE_RECORD}.*{corrupt}"):
            prepare(prepare_cfg(tmp_path, "quickdraw", tmp_path / "data", "verify=true"))
    assert any("1 listed images cannot be decoded" in r.getMessage() for r in caplog.records)
    assert (root / "zeroshot" / UNREADABLE_RECORD).read_text() == f"{corrupt}\n"
    data = load_split(prepare_cfg(tmp_path, "quickdraw", tmp_path / "data", "data.strict=false").data)
    assert corrupt not in data.zero_sketch.paths and len(data.zero_sketch) == 59

    build_tree(shared_splits, tmp_path / "data", "quickdraw")  # repaired: a new verify clears the record
    prepare(prepare_cfg(tmp_path, "quickdraw", tmp_path / "data", "verify=true"))
    assert not (root / "zeroshot" / UNREADABLE_RECORD).exists()


def test_image_cache_gives_the_same_pixels_without_decoding(shared_splits, tmp_path):
    root = build_tree(shared_splits, tmp_path / "data", "tuberlin")
    cfg = prepare_cfg(tmp_path, "tuberlin", tmp_path / "data", "cache=true", "cache_size=24", "data.image_size=24",
                      "workers=2")  # the parallel decode path
    folder = Path(prepare(cfg)["preresized_folder"])
    assert folder == tmp_path / "cache" / "images" / "tuberlin-24px"
    sketches = np.load(folder / "sketch.npy", mmap_mode="r")
    assert sketches.dtype == np.uint8 and sketches.shape[1:] == (24, 24, 3)
    assert (sketches[:, :3] == 255).all()  # 20 x 14 sketches: white padding above the drawing

    decoded = load_split(cfg.data)
    with_cache = prepare_cfg(tmp_path, "tuberlin", tmp_path / "data", "data.image_size=24", f"data.preresized_folder={folder}")
    cached = load_split(with_cache.data)
    assert cached.pixels is not None and decoded.pixels is None
    for key, domain in (("zero_sketch", "sketch"), ("zero_photo", "photo"), ("train_photo", "photo")):
        a = eval_loader(decoded, getattr(decoded, key), domain, cfg.data, "clip").dataset
        b = eval_loader(cached, getattr(cached, key), domain, cfg.data, "clip").dataset
        for i in (0, len(a) - 1):
            assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1], (key, i)

    shutil.rmtree(root / "png_ready")  # the cache alone serves the sketches: no file access
    cached = load_split(with_cache.data)
    assert eval_loader(cached, cached.zero_sketch, "sketch", cfg.data, "clip").dataset[0][0].shape == (3, 24, 24)


def test_cache_that_lacks_listed_images_is_reported(shared_splits, tmp_path):
    build_tree(shared_splits, tmp_path / "data", "quickdraw")
    cfg = prepare_cfg(tmp_path, "quickdraw", tmp_path / "data", "cache=true", "cache_size=16")
    folder = prepare(cfg)["preresized_folder"]
    zero = tmp_path / "data" / "QuickDraw" / "zeroshot" / "all_photo_zero.txt"
    zero.write_text(zero.read_text() + "images/bat/not_cached.jpg 0\n")
    with pytest.raises(DatasetError, match=r"1 listed image is absent from the image cache .*not_cached\.jpg.*cache=true"):
        load_split(prepare_cfg(tmp_path, "quickdraw", tmp_path / "data", f"data.preresized_folder={folder}").data)
    lenient = prepare_cfg(tmp_path, "quickdraw", tmp_path / "data", f"data.preresized_folder={folder}", "data.strict=false")
    assert len(load_split(lenient.data).zero_photo) == 60


def test_missing_cache_folder_is_reported(shared_splits, tmp_path):
    build_tree(shared_splits, tmp_path / "data", "quickdraw")
    with pytest.raises(DatasetError, match=r"not an image cache .*prepare data=<name> cache=true"):
        load_split(prepare_cfg(tmp_path, "quickdraw", tmp_path / "data", f"data.preresized_folder={tmp_path / 'nope'}").data)

