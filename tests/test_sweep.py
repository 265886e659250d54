"""Sweeps (`python -m zsbir.train -m ...`): a folder per job, failed jobs do not stop the others, reports."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from zsbir import report
from zsbir import train as train_entry

REPO = Path(__file__).resolve().parents[1]


def submitit_plugin_installed() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:  # not even the hydra_plugins namespace
        return False
# Tiny jobs: the smoke shrink, one epoch, no before-training evaluation.
SMALL = ["data=synthetic", "debug=smoke", "trainer.max_epochs=1", "eval.before_training=false"]


def start_sweep(output_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "zsbir.train", "-m", *SMALL, f"paths.output_dir={output_dir}", *overrides]
    return subprocess.Popen(command, cwd=output_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_two_sweeps_at_once_own_folders_a_failed_job_does_not_stop_the_others_and_a_report(tmp_path, zsbir_cache):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    # Started together (same second): one sweep of two seeds, one whose second job has a bad value.
    seeds = start_sweep(outputs, "seed=1,2")
    broken = start_sweep(outputs, "seed=3", "optim.lr=0.001,-1")
    (seeds_rc, seeds_out), (broken_rc, broken_out) = finish(seeds), finish(broken)
    assert seeds_rc == 0, seeds_out
    assert broken_rc == 1, broken_out

    sweep_dirs = sorted((outputs / "multirun").iterdir())
    assert len(sweep_dirs) == 2
    jobs = [job for sweep in sweep_dirs for job in job_dirs(sweep)]
    assert len(jobs) == len(set(jobs)) == 4
    finished = [job for job in jobs if (job / "metrics.json").is_file()]
    failed = [job for job in jobs if (job / "FAILED").is_file()]
    assert len(finished) == 3 and len(failed) == 1
    assert failed[0].name.startswith("1_") and not (failed[0] / "metrics.json").exists()
    assert "optim.lr=-1: must be a finite number > 0" in (failed[0] / "FAILED").read_text().splitlines()[0]
    job_log = (failed[0] / "train.log").read_text()
    assert "job failed" in job_log and "optim.lr=-1" in job_log  # a config error is one line, no traceback
    assert f"1 job(s) of the sweep in {failed[0].parent} failed (the others ran)" in broken_out
    assert f"{failed[0].name}: ConfigError" in broken_out

    text, notes = report.make_report([outputs], fmt="md")
    assert "| triplet_baseline | " in text and text.count("(n=3)") == 4  # seeds 1, 2, 3 in all four columns
    assert any(f"skipped failed run {failed[0]}" in note for note in notes)

    # Running the same sweep again in its folder resumes every job from its last.pt.
    seeds_dir = next(s for s in sweep_dirs if all((j / "metrics.json").exists() for j in job_dirs(s)))
    rc, output = finish(start_sweep(outputs, "seed=1,2", f"hydra.sweep.dir={seeds_dir}"))
    assert rc == 0, output
    assert all("resumed from" in (job / "train.log").read_text() for job in job_dirs(seeds_dir))
    assert len(list((outputs / "multirun").iterdir())) == 2


def sweep_config(sweep_dir: Path, hydra_overrides: list[str]):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}, "overrides": {"hydra": hydra_overrides}}})


def test_a_sweep_never_takes_over_an_existing_sweep_folder_unless_named(tmp_path):
    callback = train_entry.SweepFailureCallback()
    fresh = tmp_path / "multirun" / "2026-01-01_00-00-00_000001"
    callback.on_multirun_start(sweep_config(fresh, []))
    assert fresh.is_dir()
    with pytest.raises(SystemExit, match="already exists: another sweep started in the same microsecond"):
        callback.on_multirun_start(sweep_config(fresh, []))
    # Named on purpose (hydra.sweep.dir=...): re-running a sweep there resumes its jobs.
    callback.on_multirun_start(sweep_config(fresh, [f"hydra.sweep.dir={fresh}"]))


def test_sweep_end_exits_non_zero_and_lists_failed_jobs(tmp_path, capsys):
    callback = train_entry.SweepFailureCallback()
    (tmp_path / "0_ok").mkdir()
    callback.on_multirun_end(sweep_config(tmp_path, []))  # nothing failed: returns normally
    (tmp_path / "1_bad").mkdir()
    (tmp_path / "1_bad" / "FAILED").write_text("ValueError: bad\n\nTraceback ...")
    with pytest.raises(SystemExit) as exit_info:
        callback.on_multirun_end(sweep_config(tmp_path, []))
    assert exit_info.value.code == 1
    assert "1_bad: ValueError: bad" in capsys.readouterr().err


def test_a_failed_job_finishes_its_wandb_run_as_failed(compose_cfg, tmp_path, monkeypatch, wandb_calls):
    from zsbir.engine.trainer import Trainer

    def crash(self, batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Trainer, "train_step", crash)
    cfg = compose_cfg("debug=smoke", "logger=wandb", "eval.before_training=false")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train_entry.run(cfg, tmp_path / "run")
    import wandb

    assert wandb.run is None  # the next job of the sweep starts a fresh W&B run
    assert [run["exit_code"] for run in wandb_calls.finished] == [1]


def test_memory_is_released_between_jobs(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    train_entry.release_memory()
    assert emptied == [True]


def test_several_processes_without_a_process_group_are_refused(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(train_entry.MultiProcessLaunchError, match="started as 4 processes.*launcher=slurm_1gpu"):
        train_entry.run(compose_cfg("debug=smoke"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not submitit_plugin_installed(),
                    reason='the optional extra is not installed: pip install "zsbir[slurm]"')
@pytest.mark.parametrize("launcher, tasks", [("slurm_1gpu", 1), ("slurm_4gpu", 4)])
def test_slurm_launcher_configs_compose(launcher, tasks):
    from hydra import compose, initialize_config_dir

    from zsbir._paths import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == tasks and cfg.hydra.launcher.gpus_per_node == tasks
    assert cfg.hydra.launcher.nodes == 1 and cfg.hydra.launcher.max_num_timeout > 0


@pytest.mark.slow
@pytest.mark.skipif(not submitit_plugin_installed(), reason='the optional extra is not installed: pip install "zsbir[slurm]"')
def test_a_preempted_submitit_job_is_requeued_and_resumes_from_last_pt(tmp_path, zsbir_cache):
    """The SLURM path, run by submitit's local executor: preemption = the signal SLURM sends before a kill."""
    import signal
    import time

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    sweep = start_sweep(outputs, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "logger=wandb",
                        "trainer.max_epochs=150", "trainer.ckpt_every_steps=10", "trainer.val_every_epochs=50")
    deadline = time.monotonic() + 120
    while not list(outputs.glob("multirun/*/0_*/last.pt")) and time.monotonic() < deadline:
        time.sleep(1)
    job_processes = subprocess.run(["pgrep", "-f", f"_submit {outputs}"], capture_output=True, text=True).stdout.split()
    assert job_processes, "the submitit job process was not found"
    os.kill(int(job_processes[0]), signal.SIGUSR2)  # what SLURM sends signal_delay_s before preempting
    rc, output = finish(sweep)
    assert rc == 0, output
    job = next(outputs.glob("multirun/*/0_*"))
    job_log = (job / "train.log").read_text()
    assert "resumed from" in job_log and (job / "metrics.json").is_file()
    run_ids = {line.split("W&B run ")[1].split()[0] for line in job_log.splitlines() if "W&B run " in line}
    assert len(run_ids) == 1  # the requeued job continued the same W&B run
