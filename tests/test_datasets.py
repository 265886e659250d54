"""Benchmark datasets: configs, parsing, counts, missing and corrupt files, triplets, smoke runs.

Full real lists (../shared/splits) are parsed for the documented counts; everything that
needs images runs on tiny trees sampled from those lists (tests/datatree.py).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from datatree import DATASETS, build_tree
from zsbir.data.datamodule import eval_loader, load_split
from zsbir.data.filelist import DatasetError, read_class_file, read_filelist
from zsbir.data.pairs import EpochBatchSampler, TripletDataset
from zsbir.data.transforms import build_transform

# docs/datasets.md, "Counts" (None: approximate there, the list is built from folders)
DOCUMENTED = {
    "sketchy": dict(seen_classes=100, unseen_classes=25, train_sketch=55252, train_photo=68401, val_sketch=5000,
                    zero_sketch=15229, zero_photo=17101),
    "sketchy_split2": dict(seen_classes=104, unseen_classes=21, train_sketch=57587, train_photo=72949,
                           val_sketch=None, zero_sketch=12694, zero_photo=12553),
    "tuberlin": dict(seen_classes=220, unseen_classes=30, train_sketch=15400, train_photo=None, val_sketch=2200,
                     zero_sketch=2400, zero_photo=27989),
    "quickdraw": dict(seen_classes=80, unseen_classes=30, train_sketch=None, train_photo=None, val_sketch=None,
                      zero_sketch=92291, zero_photo=54151),
}
# docs/metrics.md, "Which metrics each table uses"
PAPER_METRICS = {"sketchy": ["map_all", "prec_100"], "sketchy_split2": ["map_200", "prec_200"],
                 "tuberlin": ["map_all", "prec_100"], "quickdraw": ["map_all", "prec_200"]}


@pytest.fixture
def tree(shared_splits, tmp_path):
    """tree(dataset) -> the data dir holding a tiny tree of `dataset`."""
    def _tree(dataset: str) -> Path:
        build_tree(shared_splits, tmp_path / "data", dataset)
        return tmp_path / "data"
    return _tree


def tiny_cfg(compose_cfg, dataset: str, data_dir: Path, *overrides: str):
    """The data config of `dataset` on a tiny tree: its counts are the tree's, not the benchmark's."""
    return compose_cfg(f"data={dataset}", f"paths.data_dir={data_dir}", "data.counts=null", "data.num_workers=0",
                       *overrides).data


# ----------------------------------------------------------------------------- configs and full lists
@pytest.mark.parametrize("dataset", list(DOCUMENTED))
def test_config_names_documented_split_counts_and_metrics(compose_cfg, dataset):
    synthetic = compose_cfg("data=synthetic").data
    data = compose_cfg(f"data={dataset}", "paths.data_dir=/datasets").data
    assert set(data.keys()) == set(synthetic.keys())  # any data override works on any dataset
    folder, split_dir, _, folders = DATASETS[dataset]
    assert data.root == f"/datasets/{folder}" and data.split_dir == split_dir
    assert dict(data.counts) == DOCUMENTED[dataset]
    assert list(data.metrics) == PAPER_METRICS[dataset]
    assert dict(data.folders or {}) == folders
    assert data.image_size == 224 and data.strict is True and data.keep_decoded_in_memory is False


@pytest.mark.parametrize("dataset", list(DOCUMENTED))
def test_real_lists_have_the_documented_counts(compose_cfg, shared_splits, dataset):
    data = compose_cfg(f"data={dataset}").data
    folder, split_dir, public, _ = DATASETS[dataset]
    split = shared_splits / folder / split_dir
    seen, unseen = read_class_file(split / "cname_cid.txt"), read_class_file(split / "cname_cid_zero.txt")
    assert (len(seen), len(unseen)) == (data.counts.seen_classes, data.counts.unseen_classes)
    assert not set(seen) & set(unseen)
    for key, name in data.lists.items():
        if not name:
            continue
        if key not in public:  # not public: built from folders, so no exact count is documented
            assert key in (data.folders or {}) and data.counts[key] is None
            continue
        filelist = read_filelist(split / name)
        assert len(filelist) == data.counts[key], key
        classes = unseen if key.startswith("zero") else seen
        assert set(filelist.labels) == set(range(len(classes))), key  # every class present, labels in range


def test_tuberlin_labels_and_paths_with_spaces(shared_splits):
    split = shared_splits / "TUBerlin" / "zeroshot"
    unseen = read_class_file(split / "cname_cid_zero.txt")
    zero = read_filelist(split / "png_ready_filelist_zero.txt")
    spaced = [(p, l) for p, l in zip(zero.paths, zero.labels) if " " in p]
    assert spaced and ("png_ready/bottle opener/2188.png", unseen.index("bottle opener")) in spaced
    assert all(p.split("/")[1] == unseen[l] for p, l in zip(zero.paths, zero.labels))  # label indexes the zero file


# ----------------------------------------------------------------------------- tiny trees
def test_tuberlin_tree_loads_paths_with_spaces(compose_cfg, tree):
    data = load_split(tiny_cfg(compose_cfg, "tuberlin", tree("tuberlin")))
    index = next(i for i, p in enumerate(data.zero_sketch.paths) if p.startswith("png_ready/bottle opener/"))
    assert data.unseen_classes[data.zero_sketch.labels[index]] == "bottle opener"
    spaced_photos = [p for p in data.train_photo.paths if p.startswith("ImageResized_ready/alarm clock/")]
    assert len(spaced_photos) == 3  # built list: a seen class whose folder has a space
    image, label, _ = eval_loader(data, data.zero_sketch, "sketch", compose_cfg("data=tuberlin", "data.num_workers=0").data,
                                  "imagenet").dataset[index]
    assert image.shape == (3, 224, 224) and data.unseen_classes[label] == "bottle opener"


def test_sketchy_duplicate_photo_entries_are_both_kept(compose_cfg, tree):
    data = load_split(tiny_cfg(compose_cfg, "sketchy", tree("sketchy")))
    for filelist in (data.zero_photo, data.train_photo):
        by_photo: dict[tuple[str, str], list[str]] = {}
        for path in filelist.paths:
            by_photo.setdefault(tuple(path.split("/")[-2:]), []).append(path)
        twins = [paths for paths in by_photo.values() if len(paths) == 2]
        assert twins, filelist.source
        for paths in twins:
            assert {p.split("/")[0] for p in paths} == {"256x256", "EXTEND_image_sketchy_ready"}
    zero_lines = (data.root / "zeroshot1" / "all_photo_filelist_zero.txt").read_text().splitlines()
    assert len(data.zero_photo) == len(zero_lines)  # nothing deduplicated


def test_quickdraw_train_lists_are_built_from_seen_class_folders(compose_cfg, tree, caplog):
    with caplog.at_level(logging.INFO, logger="zsbir.data.datamodule"):
        data = load_split(tiny_cfg(compose_cfg, "quickdraw", tree("quickdraw")))
    built = [r.getMessage() for r in caplog.records if "built it from the seen-class folders" in r.getMessage()]
    assert len(built) == 2 and any("sketch_train.txt" in m for m in built) and any("all_photo_train.txt" in m for m in built)
    photos = data.train_photo
    assert len(photos) == 80 * 3 and photos.source.startswith("built from folders")
    assert {Path(p).suffix for p in photos.paths} == {".jpg", ".JPEG", ".png"}
    assert all(p.split("/")[1] == data.seen_classes[l] for p, l in zip(photos.paths, photos.labels))
    assert set(data.val_sketch.paths).isdisjoint(data.train_sketch.paths)  # held out, not shared


def test_missing_class_folder_for_a_built_list_is_an_error(compose_cfg, tree):
    data_dir = tree("quickdraw")
    victim = data_dir / "QuickDraw" / "images" / "teapot"
    for file in victim.iterdir():
        file.unlink()
    victim.rmdir()
    with pytest.raises(DatasetError, match=r"1 of 80 seen-class folders.*images/teapot.*zsbir\.data\.prepare data=quickdraw"):
        load_split(tiny_cfg(compose_cfg, "quickdraw", data_dir))


def test_truncated_list_trips_the_count_check(compose_cfg, shared_splits, tmp_path):
    split = tmp_path / "Sketchy" / "zeroshot1"
    split.mkdir(parents=True)
    for source in (shared_splits / "Sketchy" / "zeroshot1").iterdir():
        (split / source.name).symlink_to(source)
    full = (shared_splits / "Sketchy" / "zeroshot1" / "all_photo_filelist_zero.txt").read_text().splitlines(True)
    (split / "all_photo_filelist_zero.txt").unlink()
    (split / "all_photo_filelist_zero.txt").write_text("".join(full[:-101]))  # an interrupted download
    with pytest.raises(DatasetError, match=r"zero_photo: expected 17101, found 17000.*zsbir\.data\.prepare data=sketchy"):
        load_split(compose_cfg("data=sketchy", f"paths.data_dir={tmp_path}").data)


def test_missing_dataset_folder_names_the_prepare_command(compose_cfg, tmp_path):
    with pytest.raises(DatasetError, match=r"not found: .*TUBerlin/zeroshot.*python -m zsbir\.data\.prepare data=tuberlin"):
        load_split(compose_cfg("data=tuberlin", f"paths.data_dir={tmp_path}").data)


def test_missing_files_give_one_error_or_are_skipped(compose_cfg, tree, caplog):
    data_dir = tree("quickdraw")
    root = data_dir / "QuickDraw"
    zero = read_filelist(root / "zeroshot" / "all_photo_zero.txt")
    for rel in zero.paths[:3]:
        (root / rel).unlink()
    sketch = read_filelist(root / "zeroshot" / "sketch_zero.txt").paths[-1]
    (root / sketch).unlink()
    with pytest.raises(DatasetError) as err:
        load_split(tiny_cfg(compose_cfg, "quickdraw", data_dir))
    message = str(err.value)
    assert "4 listed images are missing" in message  # one error for every list
    assert "zero_sketch: 1, zero_photo: 3" in message and str(root / zero.paths[0]) in message
    assert "python -m zsbir.data.prepare data=quickdraw" in message and "data.strict=false" in message

    complete = load_split(tiny_cfg(compose_cfg, "quickdraw", tree("quickdraw")))  # restores the files
    for rel in zero.paths[:3]:
        (root / rel).unlink()
    with caplog.at_level(logging.WARNING, logger="zsbir.data.datamodule"):
        data = load_split(tiny_cfg(compose_cfg, "quickdraw", data_dir, "data.strict=false"))
    assert len(data.zero_photo) == len(complete.zero_photo) - 3
    assert not set(zero.paths[:3]) & set(data.zero_photo.paths)
    assert any("skipping 3 of 60 zero_photo" in r.getMessage() for r in caplog.records)


def test_corrupt_image_error_names_the_file_list_and_line(compose_cfg, tree):
    data_dir = tree("quickdraw")
    data_cfg = tiny_cfg(compose_cfg, "quickdraw", data_dir, "data.image_size=16")
    data = load_split(data_cfg)
    index = 5
    (data.root / data.zero_photo.paths[index]).write_bytes(b"not an image")
    dataset = eval_loader(data, data.zero_photo, "photo", data_cfg, "imagenet").dataset
    with pytest.raises(DatasetError) as err:
        dataset[index]
    message = str(err.value)
    assert data.zero_photo.paths[index] in message and "all_photo_zero.txt, line 6" in message
    assert "python -m zsbir.data.prepare" in message and "verify=true" in message


# ----------------------------------------------------------------------------- training samples
@pytest.fixture(params=["real_lists", "synthetic"])
def training_split(request, compose_cfg):
    """training_split(dataset) -> SplitData: a tiny tree of the real lists (needs ../shared/splits), or the
    generated benchmark, so that a clone without the split lists still runs the sampler checks."""

    def load(dataset: str):
        if request.param == "synthetic":
            return load_split(compose_cfg("data=synthetic").data, seed=0)
        tree = request.getfixturevalue("tree")
        return load_split(tiny_cfg(compose_cfg, dataset, tree(dataset)))

    return load


def test_triplets_never_pair_a_negative_of_the_anchor_class(training_split):
    data = training_split("tuberlin")
    triplets = TripletDataset(data.root, data.train_sketch, data.train_photo, {"sketch": lambda x: x, "photo": lambda x: x},
                              seed=3)
    # Record which list item each view came from instead of decoding images.
    triplets.cache.get = lambda root, filelist, index, domain: (filelist.labels[index], filelist.paths[index])
    draws = {}
    for epoch in range(2):
        for index in range(len(data.train_sketch)):
            item = triplets[(epoch, index)]
            anchor = data.train_sketch.labels[index]
            assert item["label"] == anchor == item["sketch"][0]
            assert item["photo_pos"][0] == anchor
            assert item["photo_neg"][0] == item["neg_label"] != anchor
            draws[(epoch, index)] = (item["photo_pos"][1], item["photo_neg"][1])
    again = TripletDataset(data.root, data.train_sketch, data.train_photo, triplets.transforms, seed=3)
    again.cache.get = triplets.cache.get
    assert all((again[key]["photo_pos"][1], again[key]["photo_neg"][1]) == draws[key] for key in list(draws)[:50])
    n = len(data.train_sketch)
    assert sum(draws[(0, i)] != draws[(1, i)] for i in range(n)) > 0.9 * n  # fresh pairs every epoch


def test_class_balanced_batches(training_split):
    data = training_split("sketchy")
    sampler = EpochBatchSampler(data.train_sketch.labels, 0, seed=1, classes_per_batch=5, items_per_class=2)
    labels = np.asarray(data.train_sketch.labels)
    for batch in sampler:
        classes, counts = np.unique(labels[[i for _, i in batch]], return_counts=True)
        assert len(classes) == 5 and set(counts) == {2}


@pytest.mark.parametrize("dataset", ["sketchy", "sketchy_split2"])
def test_model_selection_uses_seen_classes_only(compose_cfg, tree, dataset):
    data = load_split(tiny_cfg(compose_cfg, dataset, tree(dataset)))
    zero_paths = set(data.zero_sketch.paths) | set(data.zero_photo.paths)
    assert not (set(data.val_sketch.paths) | set(data.val_photo.paths)) & zero_paths
    assert set(data.val_photo.paths) <= set(data.train_photo.paths)
    seen_names = set(data.seen_classes)
    assert all(p.split("/")[-2] in seen_names for p in data.val_sketch.paths + data.val_photo.paths)


def test_sketches_are_padded_white_and_normalised_per_model(tmp_path):
    from PIL import Image

    sketch = Image.new("L", (40, 20), 0)  # all black, wide: padding is the only white
    mean = {}
    for norm in ("imagenet", "clip"):
        pixels = build_transform("sketch", 32, norm)(sketch)
        assert pixels.shape == (3, 32, 32)
        top, middle = pixels[:, 0, 16], pixels[:, 16, 16]
        assert torch.all(top > middle)  # white band above the black drawing
        mean[norm] = top
    assert not torch.allclose(mean["imagenet"], mean["clip"])  # each model family's own mean/std


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("dataset", list(DOCUMENTED))
def test_smoke_training_run_on_a_tiny_tree(compose_cfg, tree, tmp_path, dataset):
    from zsbir.train import run

    cfg = compose_cfg(f"data={dataset}", f"paths.data_dir={tree(dataset)}", "debug=smoke",
                      "eval.before_training=false", "trainer.max_epochs=1")
    result = run(cfg, str(tmp_path / "run"))
    expected = load_split(cfg.data, seed=int(cfg.seed))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == dataset == result["dataset"]
    assert (metrics["n_queries"], metrics["n_gallery"]) == (len(expected.zero_sketch), len(expected.zero_photo))
    assert metrics["metrics_order"][:2] == PAPER_METRICS[dataset]
    assert 0.0 <= metrics["test"]["map_all"] <= 1.0
    assert (tmp_path / "run" / "best.pt").is_file()
    assert os.path.getsize(tmp_path / "run" / "results.txt") > 0
