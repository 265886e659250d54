"""SAKE's class masks rebuilt from WordNet 3.0 (zsbir/data/wordnet_masks.py) and their use by loss.distill."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from zsbir.data import wordnet_masks as masks
from zsbir.losses.base import LossConfigError, LossContext
from zsbir.losses.distill import DistillationLoss, read_mask_pickle

SPLITS_WITH_SAKE_PICKLE = ("Sketchy/zeroshot1", "TUBerlin/zeroshot")


@pytest.fixture(scope="module")
def wordnet():
    pytest.importorskip("nltk", reason="rebuilding masks needs nltk (pip install 'zsbir[masks]')")
    try:
        return masks.open_wordnet()
    except masks.ClassMaskError as err:
        pytest.skip(f"WordNet 3.0 is not installed: {err}")


def class_names(split_dir: Path) -> list[str]:
    ids = masks.read_class_ids(split_dir / "cname_cid.txt")
    return sorted(ids, key=ids.get)


def sake_matrix(split_dir: Path) -> np.ndarray:
    """SAKE's pickle (through the restricted unpickler) as a float64 matrix, row = class id."""
    rows = read_mask_pickle(split_dir / "cid_mask.pickle")
    return np.stack([np.asarray(rows[cid], dtype=np.float64) for cid in range(len(rows))])


def test_rebuilding_sketchy_split1_reproduces_sakes_pickle_exactly(wordnet, shared_splits):
    """SAKE's procedure on the public photo list and Debian's WordNet 3.0: every value of every row, bit for bit."""
    split_dir = shared_splits / "Sketchy/zeroshot1"
    imagenet = masks.imagenet_synsets(wordnet, shared_splits / masks.IMAGENET_SYNSETS)
    table = masks.build_split(split_dir, imagenet, wordnet, *masks.SPLITS["Sketchy/zeroshot1"])
    rebuilt = masks.table_matrix(table, class_names(split_dir), "rebuilt")
    assert rebuilt.shape == (100, 1000)
    assert np.array_equal(rebuilt, sake_matrix(split_dir))
    assert all(entry["from"] == "photo wnids" for entry in table.values())
    assert table["pig"]["synsets"] == ["hog.n.03"] and table["pig"]["row"]["341"] == 1.0  # ImageNet 341 = hog


def test_rebuilding_tuberlin_reproduces_sakes_pickle_exactly(wordnet, shared_splits):
    split_dir = shared_splits / "TUBerlin/zeroshot"
    photo_list, fixes = masks.SPLITS["TUBerlin/zeroshot"]
    if not (split_dir / photo_list).is_file():
        pytest.skip(f"{photo_list} (the photo wnids SAKE's procedure reads) is not public; with SAKE's dataset.zip "
                    "set ZSBIR_SHARED_SPLITS to a folder holding it")
    imagenet = masks.imagenet_synsets(wordnet, shared_splits / masks.IMAGENET_SYNSETS)
    table = masks.build_split(split_dir, imagenet, wordnet, photo_list, fixes)
    assert np.array_equal(masks.table_matrix(table, class_names(split_dir), "rebuilt"), sake_matrix(split_dir))


@pytest.mark.parametrize("split", ["Sketchy/zeroshot1", "Sketchy/zeroshot0", "QuickDraw/zeroshot"])
def test_packaged_masks_equal_a_fresh_rebuild(wordnet, shared_splits, split):
    """The shipped tables are what the builder writes today (not stale); names-only splits use the class names."""
    split_dir = shared_splits / split
    photo_list, fixes = masks.SPLITS[split]
    photo_list = photo_list if (split_dir / photo_list).is_file() else None
    imagenet = masks.imagenet_synsets(wordnet, shared_splits / masks.IMAGENET_SYNSETS)
    names = class_names(split_dir)
    rebuilt = masks.table_matrix(masks.build_split(split_dir, imagenet, wordnet, photo_list, fixes), names, "rebuilt")
    assert np.array_equal(masks.packaged_mask(split_dir, names), rebuilt)


@pytest.mark.parametrize("split", SPLITS_WITH_SAKE_PICKLE)
def test_packaged_masks_equal_sakes_pickles(shared_splits, split):
    """Needs neither nltk nor WordNet: what training loads is SAKE's mask, value for value."""
    split_dir = shared_splits / split
    assert np.array_equal(masks.packaged_mask(split_dir, class_names(split_dir)), sake_matrix(split_dir))


def test_every_split_has_a_packaged_mask(shared_splits):
    for split in masks.SPLITS:
        split_dir = shared_splits / split
        names = class_names(split_dir)
        matrix = masks.packaged_mask(split_dir, names)
        assert matrix.shape == (len(names), 1000) and matrix.min() >= 0 and matrix.max() == 1.0
        assert matrix.sum() > len(names), split  # on average more than one related ImageNet class
    quickdraw = json.loads((Path(masks.__file__).parent / "class_masks" / "quickdraw_zeroshot.json").read_text())
    # spaced names SAKE's lookup misses are found with underscores (SAKE fixed those by hand)
    assert quickdraw["classes"]["wine bottle"]["synsets"] == ["wine_bottle.n.01"]
    assert quickdraw["classes"]["scorpion"]["synsets"] == ["scorpion.n.03"]  # not the zodiac sign (our fix)
    assert quickdraw["classes"]["pineapple"]["row"]["953"] == 1.0  # ImageNet 953 = pineapple, the fruit


def test_packaged_mask_rows_follow_the_given_class_order_and_name_missing_classes(shared_splits):
    split_dir = shared_splits / "Sketchy/zeroshot1"
    names = class_names(split_dir)
    full = masks.packaged_mask(split_dir, names)
    assert np.array_equal(masks.packaged_mask(split_dir, names[::-1]), full[::-1])
    with pytest.raises(masks.ClassMaskError, match=r"no row for classes \['unicorn'\].*another split"):
        masks.packaged_mask(split_dir, ["pig", "unicorn"])
    with pytest.raises(masks.ClassMaskError, match="no packaged class mask for the split folder .*Mine/zeroshot"):
        masks.packaged_mask("/data/Mine/zeroshot", names)


# ------------------------------------------------------------------ loss.distill


def distill(mask) -> DistillationLoss:
    return DistillationLoss(mask=mask, teacher_tiny=True, teacher_pretrained=None)


def test_distill_loads_the_packaged_mask_of_its_split(shared_splits):
    split_dir = shared_splits / "Sketchy/zeroshot1"
    names = class_names(split_dir)
    term = distill("wordnet")
    term.on_train_start(LossContext(class_names=names, split_dir=split_dir), names)
    assert term.class_mask.dtype == torch.float32
    assert torch.equal(term.class_mask, torch.from_numpy(sake_matrix(split_dir).astype(np.float32)))

    synthetic = distill("wordnet")  # the generated benchmark's glyphs have no ImageNet classes: off, with a log line
    synthetic.on_train_start(LossContext(class_names=["a"], split_dir=None), ["a"])
    assert synthetic.mask_path is None and synthetic.class_mask is None

    unknown = distill("wordnet")
    ctx = LossContext(class_names=names, split_dir=Path("/data/Mine/zeroshot"))
    with pytest.raises(LossConfigError, match=r"loss.distill.mask: no packaged class mask .*loss.distill.mask=null"):
        unknown.on_train_start(ctx, names)


def test_distill_reads_a_json_table_written_by_the_builder(tmp_path):
    table = {"b": {"synsets": [], "from": "class name", "row": {"3": 0.25}},
             "a": {"synsets": [], "from": "class name", "row": {"999": 1.0}}}
    path = masks.write_table(table, "Mine/zeroshot", tmp_path)
    term = distill(str(path))
    term.on_train_start(LossContext(class_names=["a", "b"]), ["a", "b"])
    assert term.class_mask.shape == (2, 1000)
    assert float(term.class_mask[0, 999]) == 1.0 and float(term.class_mask[1, 3]) == 0.25
    assert float(term.class_mask.sum()) == 1.25
    with pytest.raises(LossConfigError, match=r"no row for classes \['c'\]"):
        distill(str(path)).on_train_start(LossContext(class_names=["a", "c"]), ["a", "c"])


def test_sake_preset_uses_the_packaged_masks(compose_cfg):
    assert compose_cfg("experiment=sake").loss.distill.mask == "wordnet"


def test_missing_wordnet_names_the_fix(tmp_path):
    nltk = pytest.importorskip("nltk")
    try:
        nltk.data.find("corpora/wordnet.zip")
        pytest.skip("nltk's own WordNet is installed here, so there is nothing missing to report")
    except LookupError:
        pass
    with pytest.raises(masks.ClassMaskError, match="apt-get install wordnet-base"):
        masks.open_wordnet(tmp_path)  # no database files there, and no nltk corpus
