"""`python -m zsbir.eval`: re-evaluating a run, the embedding cache, binary-code metrics."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from zsbir.data.filelist import FileList
from zsbir.engine.checkpoint import CheckpointError, load_checkpoint, save_atomic
from zsbir.eval import __main__ as eval_cli
from zsbir.eval.hashing import ITQ, hamming_retrieval_metrics
from zsbir.eval.retrieval import EvalConfigError, Embeddings, score_embeddings
from zsbir.train import run

# Trained at 24 px (not the synthetic config's 32) so the test can see that the model's
# input size is kept when another data config is composed.
TRAIN = ["debug=smoke", "trainer.max_epochs=1", "data.image_size=24", "eval.binary.enabled=true",
         "eval.binary.bits=16", "eval.grids.queries=3", "eval.grids.top_k=4", "eval.grids.tile=32"]
EVAL_FAST = ["eval.grids.queries=2", "eval.grids.tile=32", "eval.binary.enabled=true", "eval.binary.bits=16"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, zsbir_cache):
    from hydra import compose, initialize_config_dir

    from zsbir._paths import config_dir

    out = tmp_path_factory.mktemp("evalcli")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out}", *TRAIN])
    run(cfg, str(out / "run"))
    return out / "run"


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run, for tests that change or add files in it."""
    return shutil.copytree(trained_run, tmp_path / "run")


@pytest.fixture
def evaluate_run(compose_cfg):
    def _evaluate(run_dir, *overrides):
        return eval_cli.run_eval(compose_cfg(f"run_dir={run_dir}", *EVAL_FAST, *overrides, config_name="eval"))

    return _evaluate


@pytest.fixture
def embed_calls(monkeypatch):
    """Counts the evaluator's embedding passes (one per query + gallery pair)."""
    calls = []
    original = eval_cli.embed_split

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(eval_cli, "embed_split", counting)
    return calls


# ----------------------------------------------------------------------------- training's final evaluation

def test_training_reports_binary_metrics_and_writes_grids(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("map_all", "prec_100", "map_200", "prec_200"):
        assert 0 <= metrics["test"][f"bin16/{key}"] <= 1
    assert "bin16/map_all" in metrics["metrics_order"]
    assert "bin16 mAP@all" in (trained_run / "results.txt").read_text()
    grids = metrics["retrieval_grids"]
    assert len(grids) == 3 and all((trained_run / g).is_file() for g in grids)
    logged = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    images = [r["images"]["retrieval_grids"] for r in logged if "images" in r]
    assert images == [[str(trained_run / g) for g in grids]]


def test_binary_metrics_are_itq_hamming_metrics():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    centres = torch.randn(4, 32, generator=gen)
    queries = centres[labels] + 0.8 * torch.randn(40, 32, generator=gen)
    gallery = centres[labels] + 0.8 * torch.randn(40, 32, generator=gen)
    cfg = OmegaConf.create({"protocol": "voc", "map_at": [10], "prec_at": [5], "per_class": False, "chunk_size": 7,
                            "binary": {"enabled": True, "bits": 8, "fit_on": "gallery"}})
    metrics = score_embeddings(Embeddings(queries, labels, gallery, labels), cfg, torch.device("cpu"))
    unit = torch.nn.functional.normalize
    itq = ITQ(bits=8).fit(unit(gallery, dim=1))
    expected = hamming_retrieval_metrics(itq.encode(unit(queries, dim=1)), labels, itq.encode(unit(gallery, dim=1)),
                                         labels, map_at=(10,), prec_at=(5,))
    for key in ("map_all", "map_10", "prec_5"):
        assert metrics[f"bin8/{key}"] == pytest.approx(expected[key], abs=1e-12)
    assert metrics["n_queries"] == 40 and "bin8/n_queries" not in metrics


def test_binary_bits_beyond_the_embedding_size_is_a_clear_error():
    emb = Embeddings(torch.randn(6, 4), torch.zeros(6), torch.randn(6, 4), torch.zeros(6))
    cfg = OmegaConf.create({"protocol": "voc", "map_at": [], "prec_at": [], "per_class": False,
                            "binary": {"enabled": True, "bits": 64, "fit_on": "gallery"}})
    with pytest.raises(EvalConfigError, match=r"eval.binary.bits=64 .* at most 4"):
        score_embeddings(emb, cfg, torch.device("cpu"))


# ----------------------------------------------------------------------------- the eval CLI

def test_reevaluation_reproduces_training_and_leaves_metrics_json(run_copy, evaluate_run, embed_calls):
    before = (run_copy / "metrics.json").read_bytes()
    result = evaluate_run(run_copy)
    trained = json.loads(before)["test"]
    for key in ("map_all", "prec_100", "map_200", "prec_200", "bin16/map_all"):
        assert result["test"][key] == pytest.approx(trained[key], abs=1e-6), key
    assert (run_copy / "metrics.json").read_bytes() == before
    out = run_copy / "eval" / "synthetic-best"
    written = json.loads((out / "eval_metrics.json").read_text())
    assert written["test"] == pytest.approx(result["test"]) and written["step"] == result["step"]
    assert written["image_size"] == 24 and written["checkpoint"].endswith("best.pt")
    assert "best (best.pt, step" in (out / "results.txt").read_text()
    assert len(written["retrieval_grids"]) == 2 and all((run_copy / g).is_file() for g in written["retrieval_grids"])
    assert embed_calls == [1]


def test_second_evaluation_reuses_the_cached_embeddings(run_copy, evaluate_run, embed_calls):
    first = evaluate_run(run_copy)
    second = evaluate_run(run_copy, "eval.protocol=plain")
    assert embed_calls == [1]  # the second run embedded nothing
    assert not first["embeddings_reused"] and second["embeddings_reused"]
    assert second["embeddings_cache"] == first["embeddings_cache"]
    cached = torch.load(run_copy / first["embeddings_cache"], weights_only=True)
    assert set(cached) == {"queries", "query_labels", "gallery", "gallery_labels"}
    assert second["test"]["map_all"] <= first["test"]["map_all"] + 1e-12  # plain AP <= voc AP


def test_changed_checkpoint_invalidates_the_cache(run_copy, evaluate_run, embed_calls):
    first = evaluate_run(run_copy)
    state = load_checkpoint(run_copy / "best.pt")
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.ndim > 1)
    state["model"][name] = state["model"][name] * 1.5
    save_atomic(state, run_copy / "best.pt")
    second = evaluate_run(run_copy)
    assert embed_calls == [1, 1]
    assert second["embeddings_cache"] != first["embeddings_cache"] and not second["embeddings_reused"]
    assert second["checkpoint_sha256"] != first["checkpoint_sha256"]


def test_changed_file_list_invalidates_the_cache(run_copy, evaluate_run, embed_calls):
    first = evaluate_run(run_copy)
    second = evaluate_run(run_copy, "data=synthetic", "data.max_per_class=5")
    assert embed_calls == [1, 1] and second["n_queries"] == 15 * 5
    assert second["embeddings_cache"] != first["embeddings_cache"]
    # One changed label is enough for another key.
    lists = FileList(["a.png", "b.png"], [0, 1], "x"), FileList(["c.png"], [0], "y")
    relabelled = FileList(["a.png", "b.png"], [0, 0], "x")
    key = eval_cli.embedding_cache_key("sha", "/r", *lists, 24, "imagenet", "fp32")
    assert key != eval_cli.embedding_cache_key("sha", "/r", relabelled, lists[1], 24, "imagenet", "fp32")
    assert key != eval_cli.embedding_cache_key("sha", "/r", *lists, 32, "imagenet", "fp32")
    assert key == eval_cli.embedding_cache_key("sha", "/r", *lists, 24, "imagenet", "fp32")


def test_other_data_config_keeps_the_model_input_size(run_copy, evaluate_run):
    kept = evaluate_run(run_copy, "ckpt=last", "data=synthetic", "data.max_per_class=5")
    assert kept["image_size"] == 24 and kept["checkpoint"].endswith("last.pt")
    assert (run_copy / "eval" / "synthetic-last" / "eval_metrics.json").is_file()
    resized = evaluate_run(run_copy, "ckpt=last", "image_size=32")
    assert resized["image_size"] == 32 and resized["embeddings_cache"] != kept["embeddings_cache"]


def test_user_mistakes_get_clear_errors(run_copy, tmp_path, evaluate_run, compose_cfg):
    with pytest.raises(eval_cli.RunDirError, match="no run directory given"):
        eval_cli.run_eval(compose_cfg(config_name="eval"))
    with pytest.raises(eval_cli.RunDirError, match="no config.yaml"):
        evaluate_run(tmp_path / "nowhere")
    with pytest.raises(eval_cli.RunDirError, match="ckpt=best, ckpt=last"):
        evaluate_run(run_copy, "ckpt=missing.pt")
    (run_copy / "best.pt").unlink()
    with pytest.raises(eval_cli.RunDirError, match="no best.pt"):
        evaluate_run(run_copy)
    config = OmegaConf.load(run_copy / "config.yaml")
    config.model.embed_dim = 7
    OmegaConf.save(config, run_copy / "config.yaml")
    with pytest.raises(CheckpointError, match="different model .*model.embed_dim"):
        evaluate_run(run_copy, "ckpt=last")


def test_eval_config_defaults_match_training(compose_cfg):
    """Training and `python -m zsbir.eval` take their eval node from one file, configs/eval/default.yaml."""
    train = OmegaConf.to_container(compose_cfg().eval)
    train.pop("before_training")  # training only
    assert OmegaConf.to_container(compose_cfg("run_dir=x", config_name="eval").eval) == train


# ----------------------------------------------------------------------------- protocols (docs/metrics.md)

def test_three_protocols_in_one_pass_each_under_its_key_with_counts(run_copy, evaluate_run, embed_calls):
    result = evaluate_run(run_copy, "eval.protocols=[zs,gzs,pbir]", "eval.pbir.queries_per_class=2",
                          "eval.grids.protocol=pbir")
    assert embed_calls == [1] and result["protocols"] == ["zs", "gzs", "pbir"]
    # smoke data: 15 unseen classes x 4 sketches and photos; GZS adds 20 % seen-class items
    assert (result["test"]["n_queries"], result["test"]["n_gallery"]) == (60, 60)
    assert (result["gzs"]["n_queries"], result["gzs"]["n_gallery"]) == (72, 72)
    assert (result["gzs"]["unseen"]["n_queries"], result["gzs"]["seen"]["n_queries"]) == (60, 12)
    assert (result["pbir"]["n_queries"], result["pbir"]["n_gallery"]) == (30, 30)
    trained = json.loads((run_copy / "metrics.json").read_text())["test"]
    assert result["test"]["map_all"] == pytest.approx(trained["map_all"], abs=1e-6)  # zs unchanged by the others
    written = json.loads((run_copy / "eval" / "synthetic-best" / "eval_metrics.json").read_text())
    assert written["gzs"] == result["gzs"] and written["pbir"] == result["pbir"]  # JSON keeps floats exactly
    table = (run_copy / "eval" / "synthetic-best" / "results.txt").read_text()
    assert "generalized zero-shot" in table and "seen queries" in table and "photo-based" in table
    assert len(result["retrieval_grids"]) == 2
    again = evaluate_run(run_copy, "eval.protocols=[pbir,gzs]", "eval.pbir.queries_per_class=2")
    assert embed_calls == [1] and again["embeddings_reused"]  # each protocol's embeddings cached
    assert again["gzs"] == result["gzs"]


def test_cross_dataset_evaluation_drops_the_classes_the_run_trained_on(run_copy, evaluate_run, tmp_path):
    """A second benchmark whose unseen classes include two of the run's training classes
    (written with other case, hyphens and spaces)."""
    from zsbir.data.datamodule import dataset_root

    source = dataset_root(OmegaConf.load(run_copy / "config.yaml").data)
    other = tmp_path / "other"
    shutil.copytree(source / "zeroshot", other / "zeroshot")
    for folder in ("sketch", "photo"):
        (other / folder).symlink_to(source / folder)
    names = (other / "zeroshot" / "cname_cid_zero.txt").read_text().splitlines()
    names[0], names[1] = "Shape-000 0", "SHAPE 001 1"
    (other / "zeroshot" / "cname_cid_zero.txt").write_text("\n".join(names) + "\n")
    data = ["data=synthetic", "data.synthetic=null", f"data.root={other}", "data.max_per_class=4", "cache=false"]
    kept = evaluate_run(run_copy, *data)
    assert kept["excluded_classes"] == [] and kept["n_queries"] == 15 * 4
    dropped = evaluate_run(run_copy, *data, "eval.exclude_train_classes=true")
    assert dropped["excluded_classes"] == ["Shape-000", "SHAPE 001"]
    assert (dropped["n_queries"], dropped["n_gallery"]) == (13 * 4, 13 * 4)
    written = json.loads((run_copy / "eval" / "synthetic-best" / "eval_metrics.json").read_text())
    assert written["excluded_classes"] == ["Shape-000", "SHAPE 001"]
