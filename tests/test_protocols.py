"""Evaluation protocols: GZS-SBIR (Sem-PCYC's definition), PBIR (SAKE's), cross-dataset class exclusion."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from zsbir.config import ConfigError, validate_eval_options
from zsbir.data.datamodule import SplitData
from zsbir.data.filelist import FileList
from zsbir.eval.crossdata import CrossDatasetError, drop_training_classes, normalised_class_name
from zsbir.eval.protocols import UnknownProtocolError, get_protocol, selected_protocols
from zsbir.eval.retrieval import Embeddings, score_embeddings, subset_queries
from zsbir.eval.metrics import retrieval_metrics

SEEN, UNSEEN = [f"shape_{i}" for i in range(6)], ["novel_0", "novel_1", "novel_2"]
EVAL = {"protocol": "voc", "map_at": [5], "prec_at": [5], "per_class": False, "chunk_size": None}


def items(prefix: str, classes: int, per_class: int, interleaved: bool = False) -> FileList:
    """`per_class` items of each class; class-sorted, or (interleaved) cycling through the classes."""
    pairs = ([(c, i) for i in range(per_class) for c in range(classes)] if interleaved
             else [(c, i) for c in range(classes) for i in range(per_class)])
    return FileList([f"{prefix}/{c}/{i}.png" for c, i in pairs], [c for c, _ in pairs], prefix)


def split_data() -> SplitData:
    train_photo = items("photo/train", 6, 10)
    twice = FileList(train_photo.paths + train_photo.paths[:5], train_photo.labels + train_photo.labels[:5], "twice")
    return SplitData("toy", Path("/nowhere"), SEEN, UNSEEN, items("sketch/train", 6, 10), twice,
                     items("sketch/val", 6, 3), items("photo/val", 6, 2), items("sketch/zero", 3, 10),
                     items("photo/zero", 3, 20, interleaved=True))


def gzs(**settings):
    return get_protocol("gzs", OmegaConf.create({"gzs": {"fraction": 0.2, "seed": 0, "source": "train", **settings}}))


# ----------------------------------------------------------------------------- GZS composition

def test_gzs_adds_a_fifth_of_seen_items_to_queries_and_gallery():
    data = split_data()
    task = gzs().task(data, "test")
    n_seen_sketch, n_seen_photo = int(0.2 * 30), int(0.2 * 60)  # 20 % of the test sketches / test photos
    assert len(task.queries) == 30 + n_seen_sketch and len(task.gallery) == 60 + n_seen_photo
    seen_q, unseen_q = task.queries.paths[:n_seen_sketch], task.queries.paths[n_seen_sketch:]
    assert set(seen_q) <= set(data.train_sketch.paths) and len(set(seen_q)) == n_seen_sketch
    assert unseen_q == data.zero_sketch.paths
    seen_g = task.gallery.paths[:n_seen_photo]
    assert set(seen_g) <= set(data.train_photo.paths) and len(set(seen_g)) == n_seen_photo  # duplicates drawn once
    assert task.gallery.paths[n_seen_photo:] == data.zero_photo.paths
    assert list(task.query_groups["seen"]) == list(range(n_seen_sketch))
    assert list(task.query_groups["unseen"]) == list(range(n_seen_sketch, len(task.queries)))
    assert (task.query_domain, task.gallery_domain) == ("sketch", "photo")


def test_gzs_labels_form_one_joint_label_space():
    data = split_data()
    task = gzs().task(data, "test")
    assert task.class_names == UNSEEN + SEEN
    for filelist in (task.queries, task.gallery):
        for path, label in zip(filelist.paths, filelist.labels):
            assert task.class_names[label].split("_")[0] == ("novel" if "/zero/" in path else "shape")
            assert path.split("/")[2] == str(label if "/zero/" in path else label - len(UNSEEN))


def test_gzs_sample_is_reproducible_from_its_seed_and_changes_with_it():
    data = split_data()
    first, again, other = (gzs(seed=s).task(data, "test") for s in (0, 0, 1))
    assert first.queries.paths == again.queries.paths and first.gallery.paths == again.gallery.paths
    assert first.queries.paths != other.queries.paths and first.gallery.paths != other.gallery.paths


def test_gzs_source_val_draws_the_held_out_seen_items():
    data = split_data()
    task = gzs(source="val", fraction=0.1).task(data, "test")
    assert set(task.queries.paths[:3]) <= set(data.val_sketch.paths)
    assert set(task.gallery.paths[:6]) <= set(data.val_photo.paths)
    with pytest.raises(UnknownProtocolError, match="eval.gzs .*lower eval.gzs.fraction"):
        gzs(source="val", fraction=1.0).task(data, "test")  # 30 sketches wanted, 18 held out


def test_gzs_relevance_is_by_class_over_the_joint_label_space():
    """A seen sketch that looks exactly like the unseen photos of the class with the same id is
    not rewarded: seen class 0 and unseen class 0 are different classes."""
    data = split_data()
    task = gzs(fraction=0.1).task(data, "test")
    directions = torch.eye(len(task.class_names))
    queries = directions[torch.as_tensor(task.queries.labels)]
    gallery = directions[torch.as_tensor(task.gallery.labels)]
    query_labels, gallery_labels = torch.as_tensor(task.queries.labels), torch.as_tensor(task.gallery.labels)
    seen_rows = torch.as_tensor(task.query_groups["seen"])
    queries[seen_rows] = directions[query_labels[seen_rows] - len(UNSEEN)]  # point at unseen class of the same id
    metrics = gzs().score(Embeddings(queries, query_labels, gallery, gallery_labels), OmegaConf.create(EVAL),
                          torch.device("cpu"), task=task)
    assert metrics["unseen"]["map_all"] == pytest.approx(1.0)
    assert metrics["seen"]["map_all"] < 0.5


def test_gzs_unseen_and_seen_metrics_are_the_metrics_of_each_query_subset():
    data = split_data()
    task = gzs().task(data, "test")
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(len(task.class_names), 16, generator=gen)
    ql, gl = torch.as_tensor(task.queries.labels), torch.as_tensor(task.gallery.labels)
    emb = Embeddings(centres[ql] + 1.5 * torch.randn(len(ql), 16, generator=gen), ql,
                     centres[gl] + 1.5 * torch.randn(len(gl), 16, generator=gen), gl)
    cfg, cpu = OmegaConf.create(EVAL), torch.device("cpu")
    metrics = gzs().score(emb, cfg, cpu, task=task)
    for group in ("unseen", "seen"):
        rows = task.query_groups[group]
        alone = retrieval_metrics(emb.queries[rows], ql[rows], emb.gallery, gl, map_at=(5,), prec_at=(5,))
        assert metrics[group]["map_all"] == pytest.approx(alone["map_all"], abs=1e-6)
        assert metrics[group]["n_queries"] == len(rows) and metrics[group]["n_gallery"] == len(gl)
        assert metrics[group] == pytest.approx(score_embeddings(subset_queries(emb, rows), cfg, cpu))
    # all queries: the query-weighted mean of the two groups (per-query averaging; a query whose
    # class has no photo in the gallery has no AP and is left out)
    n_seen, n_unseen = (int(np.isin(ql[task.query_groups[g]], gl).sum()) for g in ("seen", "unseen"))
    weighted = (n_seen * metrics["seen"]["map_all"] + n_unseen * metrics["unseen"]["map_all"]) / (n_seen + n_unseen)
    assert metrics["map_all"] == pytest.approx(weighted, abs=1e-6)
    assert metrics["seen"]["map_all"] != pytest.approx(metrics["unseen"]["map_all"])


# ----------------------------------------------------------------------------- PBIR

def test_pbir_queries_are_the_first_photos_of_each_class_as_sake_chooses_them():
    data = split_data()  # 3 unseen classes x 20 photos, interleaved in the list
    task = get_protocol("pbir", OmegaConf.create({"pbir": {"queries_per_class": 10}})).task(data, "test")
    photos = data.zero_photo
    expected = [p for c in range(3) for p in [q for q, l in zip(photos.paths, photos.labels) if l == c][:10]]
    assert sorted(task.queries.paths) == sorted(expected) and len(task.queries) == 30
    assert task.queries.paths == [p for p in photos.paths if p in set(expected)]  # list order kept
    assert set(task.gallery.paths) == set(photos.paths) - set(expected) and len(task.gallery) == 30
    assert (task.query_domain, task.gallery_domain) == ("photo", "photo")
    assert task.class_names == UNSEEN
    for filelist in (task.queries, task.gallery):
        assert all(int(p.split("/")[2]) == label for p, label in zip(filelist.paths, filelist.labels))


def test_test_protocols_refuse_the_validation_split_and_unknown_names():
    with pytest.raises(ValueError, match="seen-class validation uses protocol zs"):
        get_protocol("pbir").task(split_data(), "val")
    with pytest.raises(UnknownProtocolError, match="known protocols"):
        selected_protocols(OmegaConf.create({"protocols": ["zs", "gzsbir"]}))
    assert selected_protocols(OmegaConf.create({"protocols": ["pbir"]}), require_zs=True) == ["zs", "pbir"]
    assert selected_protocols(OmegaConf.create({})) == ["zs"]


def test_the_config_schema_knows_every_registered_protocol():
    from zsbir.choices import EVAL_PROTOCOLS
    from zsbir.eval.protocols import PROTOCOLS

    assert tuple(PROTOCOLS) == EVAL_PROTOCOLS


def test_eval_options_name_unknown_protocols_and_grids_of_unevaluated_ones(compose_cfg):
    cfg = compose_cfg("run_dir=x", "eval.protocols=[zs,gzs,pbir]", "eval.grids.protocol=pbir", config_name="eval")
    validate_eval_options(cfg.eval)
    with pytest.raises(ConfigError, match="eval.protocols contains 'photo'"):
        validate_eval_options(compose_cfg("run_dir=x", "eval.protocols=[zs,photo]", config_name="eval").eval)
    with pytest.raises(ConfigError, match="eval.grids.protocol='gzs' is not evaluated"):
        validate_eval_options(compose_cfg("run_dir=x", "eval.grids.protocol=gzs", config_name="eval").eval)
    with pytest.raises(ConfigError, match="eval.gzs.source"):
        validate_eval_options(compose_cfg("run_dir=x", "eval.gzs.source=test", config_name="eval").eval)


# ----------------------------------------------------------------------------- cross-dataset

def test_class_names_match_regardless_of_case_spaces_hyphens_underscores():
    assert normalised_class_name("Teddy-Bear") == normalised_class_name("teddy_bear") == normalised_class_name("teddy bear")
    assert normalised_class_name("car") != normalised_class_name("cart")


def test_dropping_training_classes_keeps_the_others_and_names_the_dropped():
    data = split_data()
    kept, dropped = drop_training_classes(data, ["Novel-1", "shape_0", "NOVEL 2 "])
    assert dropped == ["novel_1", "novel_2"]
    assert set(kept.zero_sketch.labels) == set(kept.zero_photo.labels) == {0}
    assert len(kept.zero_sketch) == 10 and len(kept.zero_photo) == 20
    assert kept.unseen_classes == UNSEEN and kept.train_sketch is data.train_sketch
    with pytest.raises(CrossDatasetError, match="every unseen class .*exclude_train_classes=false"):
        drop_training_classes(data, UNSEEN)
    assert np.array_equal(drop_training_classes(data, ["zebra"])[0].zero_photo.labels, data.zero_photo.labels)


# ----------------------------------------------------------------------------- training's final test

def test_training_writes_each_selected_protocol_under_its_key(compose_cfg, tmp_path):
    import json

    from zsbir.train import run

    cfg = compose_cfg("debug=smoke", "trainer.max_epochs=1", "eval.before_training=false", "eval.protocols=[gzs]",
                      "eval.grids.protocol=gzs", "eval.grids.queries=2", "eval.grids.tile=16")
    run(cfg, str(tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["protocols"] == ["zs", "gzs"]  # zs always: its `test` key is the run's headline
    assert (metrics["test"]["n_queries"], metrics["test"]["n_gallery"]) == (60, 60)
    assert (metrics["gzs"]["n_queries"], metrics["gzs"]["n_gallery"]) == (72, 72)
    assert metrics["gzs"]["seen"]["n_queries"] == 12 and metrics["gzs"]["unseen"]["n_queries"] == 60
    assert set(metrics["test_eval_seconds"]) == {"embed", "score_zs", "score_gzs"}
    assert len(metrics["retrieval_grids"]) == 2
    table = (tmp_path / "run" / "results.txt").read_text()
    assert "unseen-class retrieval" in table and "generalized zero-shot" in table
