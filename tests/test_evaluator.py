"""The Evaluator: one protocol interface shared by training, the eval CLI and the benchmarks."""
from __future__ import annotations

import json

import pytest
import torch

from zsbir.data.datamodule import load_split
from zsbir.eval.evaluator import Evaluator
from zsbir.eval.protocols import PROTOCOLS, Protocol, RetrievalTask, UnknownProtocolError, get_protocol
from zsbir.models.encoder import build_encoder


class PhotoToPhoto(Protocol):
    """A protocol the way a later issue adds one: unseen photos query the unseen photos."""

    name = "p2p_test"
    result_key = "test_p2p"
    title = "photo-to-photo retrieval"

    def task(self, data, split: str) -> RetrievalTask:
        return RetrievalTask(data.zero_photo, "photo", data.zero_photo, "photo", data.unseen_classes)


@pytest.fixture
def smoke(compose_cfg):
    cfg = compose_cfg("debug=smoke", "trainer.device=cpu")
    data = load_split(cfg.data, seed=0)
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, len(data.seen_classes)).eval()
    return cfg, data, encoder


def test_a_protocol_added_in_eval_only_is_evaluated_end_to_end(smoke, tmp_path, monkeypatch):
    cfg, data, encoder = smoke
    monkeypatch.setitem(PROTOCOLS, PhotoToPhoto.name, PhotoToPhoto)
    standard = Evaluator(data, cfg.data, cfg.eval, encoder.norm, torch.device("cpu"))
    photos = Evaluator(data, cfg.data, cfg.eval, encoder.norm, torch.device("cpu"), protocol="p2p_test")
    zs_metrics, zs_embeddings = standard.evaluate_with_embeddings(encoder)
    p2p_metrics, p2p_embeddings = photos.evaluate_with_embeddings(encoder)
    # the new protocol's queries are the gallery photos themselves, embedded in the photo domain
    assert torch.equal(p2p_embeddings.queries, p2p_embeddings.gallery)
    assert torch.equal(p2p_embeddings.gallery, zs_embeddings.gallery)
    assert p2p_metrics["n_queries"] == len(data.zero_photo) and zs_metrics["n_queries"] == len(data.zero_sketch)
    assert p2p_metrics["map_all"] != zs_metrics["map_all"]
    table = photos.table({"random network": p2p_metrics})
    assert table.startswith("photo-to-photo retrieval (protocol: voc)")
    result = {**photos.describe(), photos.protocol.result_key: p2p_metrics}
    photos.write_results(tmp_path, "metrics.json", result, table)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test_p2p"]["map_all"] == pytest.approx(p2p_metrics["map_all"])
    assert written["metrics_order"] == ["map_all", "prec_100", "map_200", "prec_200"]


def test_loaders_are_built_once_per_split(smoke):
    cfg, data, encoder = smoke
    evaluator = Evaluator(data, cfg.data, cfg.eval, encoder.norm, torch.device("cpu"))
    assert evaluator.loaders("val") is evaluator.loaders("val")
    assert evaluator.loaders("test") is not evaluator.loaders("val")
    assert evaluator.precision == "fp32"  # no autocast on the CPU


def test_unknown_protocol_is_named():
    with pytest.raises(UnknownProtocolError, match="unknown evaluation protocol 'bogus' in eval.protocols; known: "
                                                   "\\['fg', 'gzs', 'pbir', 'zs'\\]"):
        get_protocol("bogus")
    with pytest.raises(ValueError, match="protocol zs has splits 'test' and 'val'"):
        get_protocol("zs").task(None, "train")
