"""Tracking: the local log.jsonl always; W&B offline runs with the expected keys; resume; outages."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from zsbir.tracking import Tracker, build_tracker


# ---------------------------------------------------------------------------- helpers
# W&B keeps an offline run in its binary `run-<id>.wandb` log, a private format; its public
# reader (wandb.Api) needs a server, and wandb 0.31 writes no wandb-summary.json or
# config.yaml for offline runs (wandb/wandb#11279 adds them). So these tests read W&B's
# public Python API: what the trackers hand to `Run.log`, `Run.define_metric` and
# `Run.finish`, and the `Run.summary` / `Run.config` W&B made of it (its summary holds, e.g.,
# the best value of a metric summarised by max), recorded by the pass-through `wandb_calls`
# fixture (tests/conftest.py).
def exits(calls) -> list[tuple[str, int]]:
    return [(run["id"], run["exit_code"]) for run in calls.finished]


def local_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def wandb_cfg(compose_cfg):
    return compose_cfg("logger=wandb", "logger.group=unit-tests", "logger.tags=[a,b]", "method=unit_method", "seed=3")


# ---------------------------------------------------------------------------- local tracker
def test_logger_none_is_the_default_and_writes_the_local_log(compose_cfg, tmp_path):
    cfg = compose_cfg()
    assert cfg.logger.name == "none"
    tracker = build_tracker(cfg.logger, cfg, tmp_path)
    assert type(tracker) is Tracker
    tracker.log({"loss": torch.tensor(0.5), "lr": 1e-3}, step=1)
    tracker.summary({"test/map_all": float("nan")})
    tracker.finish()
    lines = local_log(tmp_path)
    assert lines[0]["step"] == 1 and lines[0]["loss"] == 0.5 and lines[0]["lr"] == 1e-3
    assert lines[1]["summary"] == {"test/map_all": "nan"}
    assert not (tmp_path / "wandb").exists()


# ---------------------------------------------------------------------------- W&B offline
def test_wandb_offline_run_has_filter_keys_config_metrics_best_summaries_and_images(wandb_cfg, wandb_calls, tmp_path):
    grid = tmp_path / "grid_step2.png"
    Image.new("RGB", (8, 8), "red").save(grid)
    tracker = build_tracker(wandb_cfg.logger, wandb_cfg, tmp_path)
    run = tracker.run
    assert (run.id, run.project, run.group, list(run.tags), run.name, run.settings.mode) == (
        tracker.run_id, "zsbir", "unit-tests", ["a", "b"], "unit_method-synthetic-seed3", "offline")
    assert Path(run.dir).is_relative_to(tmp_path / "wandb")  # beside log.jsonl in the run directory
    tracker.log({"loss": torch.tensor(0.75), "loss/triplet": 0.75, "lr": 1e-3, "epoch": 0}, step=1)
    tracker.log({"val/map_all": 0.40, "val/prec_100": 0.5, "val/n_queries": 10}, step=1)
    tracker.log({"val/map_all": 0.30, "val/prec_100": 0.6, "val/n_queries": 10}, step=2)
    tracker.log_images("retrieval/unseen", [grid], step=2)
    tracker.summary({"test/map_all": 0.25, "test/prec_100": 0.125})
    assert tracker.state_dict() == {"wandb_run_id": tracker.run_id}
    tracker.finish()
    tracker.finish()  # idempotent: the entry point finishes again after a failure
    assert exits(wandb_calls) == [(tracker.run_id, 0)]

    rows = wandb_calls.history()
    assert rows[0] == {"step": 1, "loss": 0.75, "loss/triplet": 0.75, "lr": 1e-3, "epoch": 0}  # tensors as numbers
    assert [r["val/map_all"] for r in rows if "val/map_all" in r] == [0.40, 0.30]
    assert rows[-1]["step"] == 2 and list(rows[-1]) == ["step", "retrieval/unseen"]
    metrics = wandb_calls.metrics
    assert metrics["val/map_all"] == {"step_metric": "step", "summary": "max"}
    assert metrics["val/n_queries"] == {"step_metric": "step", "summary": None}
    assert metrics["loss"] == {"step_metric": "step", "summary": None} and metrics["step"] == {}

    stored = wandb_calls.finished[0]
    config = stored["config"]
    assert {k: config[k] for k in ("method", "model", "dataset", "split", "seed", "protocol", "per_class")} == {
        "method": "unit_method", "model": "small_cnn", "dataset": "synthetic", "split": "zeroshot", "seed": 3,
        "protocol": "voc", "per_class": False}
    assert config["cfg"]["optim"]["lr"] == wandb_cfg.optim.lr and config["cfg"]["data"]["name"] == "synthetic"
    summary = stored["summary"]
    assert summary["test/map_all"] == 0.25 and summary["test/prec_100"] == 0.125
    assert summary["val/map_all"] == {"max": 0.40}  # the best value, not the last (0.30)
    assert summary["loss"] == 0.75  # not summarised by max: the last value
    images = summary["retrieval/unseen"]
    assert images["_type"] == "images/separated" and images["captions"] == ["grid_step2"]
    assert all((Path(run.dir) / name).is_file() for name in images["filenames"])

    # The local log holds the same values, whatever W&B does.
    lines = local_log(tmp_path)
    assert lines[0]["loss"] == 0.75 and lines[3]["images"] == {"retrieval/unseen": [str(grid)]}
    assert lines[4]["summary"]["test/map_all"] == 0.25


def test_resumed_tracker_continues_the_same_wandb_run(wandb_cfg, wandb_calls, tmp_path):
    first = build_tracker(wandb_cfg.logger, wandb_cfg, tmp_path)
    first.log({"loss": 1.0}, step=5)
    state = first.state_dict()
    first.finish()
    second = build_tracker(wandb_cfg.logger, wandb_cfg, tmp_path, resume_state=state)
    second.log({"loss": 0.5}, step=3)  # a resumed run repeats the steps after its last checkpoint
    second.finish()
    assert second.run_id == first.run_id
    assert exits(wandb_calls) == [(first.run_id, 0), (first.run_id, 0)]
    assert [r["step"] for r in wandb_calls.history(first.run_id) if "loss" in r] == [5, 3]
    assert [run["summary"]["loss"] for run in wandb_calls.finished] == [1.0, 0.5]


def test_wandb_outage_at_init_degrades_to_the_local_log(wandb_cfg, tmp_path, monkeypatch, caplog):
    import wandb

    def unreachable(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", unreachable)
    with caplog.at_level(logging.WARNING, logger="zsbir.tracking"):
        tracker = build_tracker(wandb_cfg.logger, wandb_cfg, tmp_path)
        tracker.log({"loss": 1.0}, step=1)
        tracker.summary({"test/map_all": 0.5})
        tracker.finish(exit_code=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "W&B init failed" in warnings[0] and "local log only" in warnings[0]
    lines = local_log(tmp_path)
    assert "unreachable" in lines[0]["wandb_error"]
    assert lines[1]["loss"] == 1.0 and lines[2]["summary"] == {"test/map_all": 0.5}
    assert tracker.state_dict()["wandb_run_id"]  # the id is kept: a resumed run can still create it


def test_wandb_failure_mid_run_warns_once_and_finishes_the_run(wandb_cfg, wandb_calls, tmp_path, caplog):
    tracker = build_tracker(wandb_cfg.logger, wandb_cfg, tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("wandb-core crashed")

    tracker.run.log = broken
    with caplog.at_level(logging.WARNING, logger="zsbir.tracking"):
        for step in range(1, 4):
            tracker.log({"loss": 1.0 / step}, step=step)
        tracker.summary({"test/map_all": 0.5})
        tracker.finish()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "W&B log failed" in warnings[0]
    assert tracker.run is None
    assert [line.get("step") for line in local_log(tmp_path) if "loss" in line] == [1, 2, 3]
    assert exits(wandb_calls) == [(tracker.run_id, 1)]  # the abandoned W&B run is marked failed


# ---------------------------------------------------------------------------- through the trainer
def test_trainer_keeps_the_wandb_run_id_in_its_checkpoint_and_resumes_that_run(compose_cfg, wandb_calls, tmp_path):
    from zsbir.engine.checkpoint import load_checkpoint
    from zsbir.engine.trainer import Trainer

    cfg = compose_cfg("debug=smoke", "logger=wandb", "trainer.max_epochs=1", "eval.before_training=false")
    run_dir = tmp_path / "run"
    Trainer(cfg, run_dir).fit()
    run_id = load_checkpoint(run_dir / "last.pt")["tracker"]["wandb_run_id"]
    assert exits(wandb_calls) == [(run_id, 0)]
    assert any("val/map_all" in row for row in wandb_calls.history(run_id))
    assert "test/map_all" in wandb_calls.finished[0]["summary"]

    Trainer(cfg, run_dir).fit()  # same directory: resumes from last.pt, re-opens the same W&B run
    assert exits(wandb_calls) == [(run_id, 0), (run_id, 0)]


def test_only_rank_zero_builds_a_tracker(compose_cfg, tmp_path, monkeypatch):
    from zsbir.engine import distributed
    from zsbir.engine.trainer import Trainer

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    trainer = Trainer(compose_cfg("debug=smoke", "logger=wandb"), tmp_path / "rank1")
    assert trainer.tracker is None
    assert not (tmp_path / "rank1" / "wandb").exists()
