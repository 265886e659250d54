"""Tracking: the local log.jsonl always; W&B offline runs with the expected keys; resume; outages."""
from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from zsbir.tracking import Tracker, build_tracker


# ---------------------------------------------------------------------------- helpers
def wandb_records(run_dir: Path) -> list:
    """Every record of the offline W&B runs under `run_dir`, oldest run first.

    An offline run keeps its data in `run-<id>.wandb`: a 7-byte header (`:W&B`, magic,
    version) followed by a LevelDB-style log (32 KiB blocks; each chunk has a 4-byte CRC,
    a 2-byte length and a 1-byte type: 1 full, 2 first, 3 middle, 4 last) of protobuf
    `Record`s. Reading it here keeps the test independent of which W&B version writes
    which side files in offline mode.
    """
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B", f"{path} is not a W&B data file"
        while pos + 7 <= len(data):
            space_in_block = 32768 - pos % 32768
            if space_in_block < 7:  # block trailer padding
                pos += space_in_block
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                break
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def finished_wandb_records(run_dir: Path, runs: int, timeout_s: float = 30.0) -> list:
    """`wandb_records` once `runs` runs have written their exit record.

    W&B's writer process may still be flushing a run's file for a moment after `finish()`
    returns in this process.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(run_dir)
        if len(of_kind(records, "exit")) >= runs or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def of_kind(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def as_dict(items, values: dict | None = None) -> dict:
    """Key/value items (`key`, or a `nested_key` path) as one nested dict."""
    values = {} if values is None else values
    for item in items:
        *parents, last = [item.key] if item.key else list(item.nested_key)
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = json.loads(item.value_json)
    return values


def history(records) -> list[dict]:
    return [as_dict(h.item) for h in of_kind(records, "history")]


def config_values(records) -> dict:
    values = {}
    for run in of_kind(records, "run"):
        as_dict(run.config.update, values)
    for config in of_kind(records, "config"):
        as_dict(config.update, values)
    return values


def summary_values(records) -> dict:
    values = {}
    for summary in of_kind(records, "summary"):
        as_dict(summary.update, values)
    return values


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
def test_wandb_offline_run_has_filter_keys_config_metrics_best_summaries_and_images(wandb_cfg, tmp_path):
    grid = tmp_path / "grid_step2.png"
    Image.new("RGB", (8, 8), "red").save(grid)
    tracker = build_tracker(wandb_cfg.logger, wandb_cfg, tmp_path)
    tracker.log({"loss": torch.tensor(0.75), "loss/triplet": 0.75, "lr": 1e-3, "epoch": 0}, step=1)
    tracker.log({"val/map_all": 0.40, "val/prec_100": 0.5, "val/n_queries": 10}, step=1)
    tracker.log({"val/map_all": 0.30, "val/prec_100": 0.6, "val/n_queries": 10}, step=2)
    tracker.log_images("retrieval/unseen", [grid], step=2)
    tracker.summary({"test/map_all": 0.25, "test/prec_100": 0.125})
    assert tracker.state_dict() == {"wandb_run_id": tracker.run_id}
    tracker.finish()
    tracker.finish()  # idempotent: the entry point finishes again after a failure

    records = finished_wandb_records(tmp_path, runs=1)
    assert records, "no offline W&B run directory under the run dir"
    run = of_kind(records, "run")[0]
    assert run.run_id == tracker.run_id
    assert run.project == "zsbir" and run.run_group == "unit-tests" and list(run.tags) == ["a", "b"]
    assert run.display_name == "unit_method-synthetic-seed3"

    config = config_values(records)
    assert {k: config[k] for k in ("method", "model", "dataset", "split", "seed", "protocol", "per_class")} == {
        "method": "unit_method", "model": "small_cnn", "dataset": "synthetic", "split": "zeroshot", "seed": 3,
        "protocol": "voc", "per_class": False}
    full = config["cfg"]["value"] if "value" in config["cfg"] else config["cfg"]
    assert full["optim"]["lr"] == wandb_cfg.optim.lr and full["data"]["name"] == "synthetic"

    rows = history(records)
    assert {"step": 1, "loss": 0.75, "loss/triplet": 0.75, "lr": 1e-3, "epoch": 0}.items() <= rows[0].items()
    assert [r["val/map_all"] for r in rows if "val/map_all" in r] == [0.40, 0.30]
    image_rows = [r for r in rows if "retrieval/unseen" in r]
    images = image_rows[0]["retrieval/unseen"]
    assert image_rows[0]["step"] == 2 and images["_type"] == "images/separated" and images["captions"] == ["grid_step2"]
    assert all((next(tmp_path.glob("wandb/offline-run-*")) / "files" / name).is_file() for name in images["filenames"])

    metrics = {m.name: m for m in of_kind(records, "metric")}
    assert metrics["val/map_all"].step_metric == "step" and metrics["val/map_all"].summary.max
    assert not metrics["val/n_queries"].summary.max and not metrics["loss"].summary.max

    summary = summary_values(records)
    assert summary["test/map_all"] == 0.25
    assert summary["val/map_all"] == {"max": 0.40}  # the best value, not the last (0.30)
    assert of_kind(records, "exit")[0].exit_code == 0

    # The local log holds the same values, whatever W&B does.
    lines = local_log(tmp_path)
    assert lines[0]["loss"] == 0.75 and lines[3]["images"] == {"retrieval/unseen": [str(grid)]}
    assert lines[4]["summary"]["test/map_all"] == 0.25


def test_resumed_tracker_continues_the_same_wandb_run(wandb_cfg, tmp_path):
    first = build_tracker(wandb_cfg.logger, wandb_cfg, tmp_path)
    first.log({"loss": 1.0}, step=5)
    state = first.state_dict()
    first.finish()
    second = build_tracker(wandb_cfg.logger, wandb_cfg, tmp_path, resume_state=state)
    second.log({"loss": 0.5}, step=3)  # a resumed run repeats the steps after its last checkpoint
    second.finish()
    assert second.run_id == first.run_id
    records = finished_wandb_records(tmp_path, runs=2)
    assert [run.run_id for run in of_kind(records, "run")] == [first.run_id, first.run_id]
    assert [r["step"] for r in history(records) if "loss" in r] == [5, 3]


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


def test_wandb_failure_mid_run_warns_once_and_finishes_the_run(wandb_cfg, tmp_path, caplog):
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
    assert of_kind(finished_wandb_records(tmp_path, runs=1), "exit")[0].exit_code == 1  # the abandoned W&B run is marked failed


# ---------------------------------------------------------------------------- through the trainer
def test_trainer_keeps_the_wandb_run_id_in_its_checkpoint_and_resumes_that_run(compose_cfg, tmp_path):
    from zsbir.engine.checkpoint import load_checkpoint
    from zsbir.engine.trainer import Trainer

    cfg = compose_cfg("debug=smoke", "logger=wandb", "trainer.max_epochs=1", "eval.before_training=false")
    run_dir = tmp_path / "run"
    Trainer(cfg, run_dir).fit()
    run_id = load_checkpoint(run_dir / "last.pt")["tracker"]["wandb_run_id"]
    records = finished_wandb_records(run_dir, runs=1)
    assert of_kind(records, "run")[0].run_id == run_id
    assert any("val/map_all" in row for row in history(records))
    assert "test/map_all" in summary_values(records)

    Trainer(cfg, run_dir).fit()  # same directory: resumes from last.pt, re-opens the same W&B run
    assert [run.run_id for run in of_kind(finished_wandb_records(run_dir, runs=2), "run")] == [run_id, run_id]


def test_only_rank_zero_builds_a_tracker(compose_cfg, tmp_path, monkeypatch):
    from zsbir.engine import distributed
    from zsbir.engine.trainer import Trainer

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    trainer = Trainer(compose_cfg("debug=smoke", "logger=wandb"), tmp_path / "rank1")
    assert trainer.tracker is None
    assert not (tmp_path / "rank1" / "wandb").exists()
