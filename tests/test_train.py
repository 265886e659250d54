"""End-to-end training on the synthetic benchmark: learning, run-directory contents, resume."""
from __future__ import annotations

import json

import pytest

from zsbir.engine.checkpoint import load_checkpoint
from zsbir.train import run

# Small but real: ~110 steps on the full synthetic benchmark. Seen-class CE next to the
# triplets makes the first hundred steps count (the default recipe needs ~700 steps).
SHORT = ["trainer.max_epochs=5", "trainer.val_every_epochs=5", "loss=[triplet,triplet_hard,ce]", "model.cls_head=true",
         "trainer.progress_bar=false", "trainer.log_every=5"]


def _train(out, *overrides):
    from hydra import compose, initialize_config_dir

    from zsbir._paths import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out}", *overrides])
    return out / "run", run(cfg, str(out / "run"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, zsbir_cache):
    """A short real training (~110 steps on the full synthetic benchmark): slow, learning only."""
    return _train(tmp_path_factory.mktemp("train"), *SHORT)


@pytest.fixture(scope="module")
def smoke_trained(tmp_path_factory, zsbir_cache):
    """A smoke-size run on the full synthetic test split: what a run directory holds."""
    return _train(tmp_path_factory.mktemp("smoke"), "debug=smoke", "data.max_per_class=null",
                  "trainer.log_every=1", "eval.grids.queries=2")


@pytest.mark.slow  # about 2 minutes on 2 cores; README's main job and `zsbir.bench seeds` measure learning
def test_short_training_beats_the_untrained_network(trained):
    _, result = trained
    before, after = result["test_before_training"]["map_all"], result["test"]["map_all"]
    assert after > before + 0.03, (before, after)


def test_run_directory_holds_everything(smoke_trained):
    run_dir, result = smoke_trained
    for name in ("config.yaml", "run_info.json", "log.jsonl", "last.pt", "best.pt", "metrics.json", "results.txt"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["protocol"] == "voc"
    assert metrics["n_queries"] == 15 * 24 and metrics["n_gallery"] == 15 * 24
    assert metrics["params_total"] >= metrics["params_trainable"] > 0
    assert metrics["world_size"] == 1 and metrics["wall_time_s"] > 0
    for key in ("map_all", "prec_100", "map_200", "prec_200"):
        assert 0 <= metrics["test"][key] <= 1
    info = json.loads((run_dir / "run_info.json").read_text())
    from importlib import metadata

    for package in ("torch", "timm", "hydra-core", "numpy"):  # the installed versions, not just any string
        assert info["packages"][package] == metadata.version(package), package
    assert "commit" in info["git"]
    # Checkpoints load with weights_only=True (load_checkpoint uses it) and carry the step.
    assert load_checkpoint(run_dir / "last.pt")["step"] == metrics["steps"]
    # The table printed at the end has both rows.
    table = (run_dir / "results.txt").read_text()
    assert "untrained network" in table and "trained (best.pt" in table and "mAP@all" in table


def test_rerun_in_the_same_directory_resumes(compose_cfg, tmp_path, caplog):
    run_dir = tmp_path / "run"
    overrides = ["debug=smoke", "trainer.max_epochs=1"]
    first = run(compose_cfg(*overrides), str(run_dir))
    assert first["steps"] == 3
    # Same directory, longer schedule: training continues from the saved step, not from 0.
    with caplog.at_level("INFO", logger="zsbir.train"):
        second = run(compose_cfg(*overrides[:1], "trainer.max_epochs=2"), str(run_dir))
    assert "resumed from" in caplog.text and "at step 3" in caplog.text
    assert second["steps"] == 6
    assert second["test_before_training"] == first["test_before_training"]  # kept, not recomputed
    assert second["wall_time_s"] > first["wall_time_s"]  # the wall time counts every session
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]
