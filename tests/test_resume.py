"""Exact resume: a run killed (SIGKILL) or preempted (SIGTERM) mid-epoch and started again
with the same command in the same run directory ends bit-identical to an uninterrupted run.

Runs are real `python -m zsbir.train` subprocesses on a smoke-sized deterministic CPU
config; they are interrupted from outside once their `last.pt` shows a given step.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zsbir.engine.checkpoint import CheckpointError, load_checkpoint
from zsbir.engine.preemption import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 8
EPOCHS = 3
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
# Deterministic CPU smoke run, last.pt after every step (so an interruption can land anywhere).
# Stochastic depth makes every training step draw from torch's global RNG, so a resume that
# failed to restore it could not go unnoticed (the data pipeline seeds its own generators).
RUN = ["debug=smoke", "deterministic=true", "trainer.device=cpu", f"trainer.max_epochs={EPOCHS}",
       f"trainer.limit_train_batches={STEPS_PER_EPOCH}", "trainer.ckpt_every_steps=1", "trainer.ckpt_every_s=null",
       "model.tiny=false", "+model.model_kwargs.drop_path_rate=0.2"]
# What must be identical between an uninterrupted and an interrupted-and-resumed run.
COMPARED = ("test", "test_before_training", "best_val", "steps", "epochs", "nonfinite_steps", "n_queries", "n_gallery")


def start(run_dir: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ZSBIR_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "zsbir.train", *RUN, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def saved_step(run_dir: Path) -> int:
    """The step of the run's last.pt (-1 if none); safe while the run writes it (atomic rename)."""
    try:
        return int(load_checkpoint(run_dir / "last.pt")["step"])
    except CheckpointError:
        return -1


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while saved_step(run_dir) < step:
        if process.poll() is not None:
            pytest.fail(f"the run ended (rc {process.returncode}) before step {step}:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no last.pt with step >= {step} after {timeout} s")
        time.sleep(0.02)


def results(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {key: metrics[key] for key in COMPARED}


def assert_same_state(a: Path, b: Path) -> None:
    """Model, loss-term and optimizer tensors of two checkpoints are bit-identical."""
    first, second = load_checkpoint(a), load_checkpoint(b)
    for part in ("model", "losses"):
        assert first[part].keys() == second[part].keys()
        for key in first[part]:
            assert torch.equal(first[part][key], second[part][key]), f"{a.name}: {part}.{key} differs"
    for index, state in first["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, second["optimizer"]["state"][index][key]), f"optimizer state {index}.{key} differs"
    assert first["scheduler"] == second["scheduler"]
    assert (first["step"], first["epoch"], first["best_step"]) == (second["step"], second["epoch"], second["best_step"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, zsbir_cache) -> Path:
    """An uninterrupted run of the same command."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    rc, output = finish(start(run_dir, zsbir_cache))
    assert rc == 0, output
    return run_dir


# Slow (~45 s): the SLURM tests (tests/test_slurm_real.py) check requeued runs equal uninterrupted ones in CI.
@pytest.mark.parametrize("workers", [pytest.param(0, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_preempted_then_killed_run_resumes_to_exactly_the_uninterrupted_result(reference, tmp_path, zsbir_cache,
                                                                                workers):
    """SIGTERM in epoch 1 (clean stop, exit 75), SIGKILL in epoch 2, then a run to the end.

    With DataLoader workers the interrupted run must still match the (0-worker) reference:
    the data do not depend on the number of workers, nor on where a run was resumed.
    """
    run_dir = tmp_path / "run"
    command = run_dir, zsbir_cache, f"data.num_workers={workers}"
    process = start(*command)
    wait_for_step(process, run_dir, 3)
    process.send_signal(signal.SIGTERM)
    rc, output = finish(process, timeout=120)
    assert rc == EXIT_PREEMPTED, output
    stopped = load_checkpoint(run_dir / "last.pt")
    assert 3 <= stopped["step"] < STEPS_PER_EPOCH and not (run_dir / "metrics.json").exists()
    assert f"PreemptedError: stopped by SIGTERM at step {stopped['step']}" in output
    assert "Traceback" not in output

    process = start(*command)  # the same command: resumes, then is killed without warning
    wait_for_step(process, run_dir, STEPS_PER_EPOCH + 3)
    process.send_signal(signal.SIGKILL)
    output, _ = process.communicate(timeout=60)
    assert f"resumed from {run_dir / 'last.pt'} at step {stopped['step']}" in output
    killed = load_checkpoint(run_dir / "last.pt")
    assert STEPS_PER_EPOCH < killed["step"] < TOTAL_STEPS and killed["batch_in_epoch"] > 0, "not killed mid-epoch"
    assert not (run_dir / "metrics.json").exists()
    # What a kill in the middle of a checkpoint write leaves behind; the resumed run removes it.
    (run_dir / ".last.pt.4242-0badf00d.tmp").write_bytes(b"half a checkpoint")

    rc, output = finish(start(*command))
    assert rc == 0, output
    assert f"at step {killed['step']}" in output
    assert "unseen-class mAP@all before training" not in output  # evaluated once, in the first run
    assert not list(run_dir.glob(".*.tmp"))
    assert results(run_dir) == results(reference)
    assert_same_state(run_dir / "last.pt", reference / "last.pt")
    assert_same_state(run_dir / "best.pt", reference / "best.pt")
