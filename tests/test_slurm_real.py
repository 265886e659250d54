"""The cluster path on a real SLURM: a single-node cluster (scripts/slurm_local.sh) started
for this module, sweeps through `launcher=slurm_1gpu`, preemption and time-limit requeues,
the plain `sbatch` script of docs/reliability.md, a 2-task DDP step, a failed job.

Needs root and Debian's `slurm-wlm` and `munge` (CI installs them); skipped with the reason
otherwise. Jobs are smoke-sized; a test harness (tests/slurm_pace/sitecustomize.py) slows
steps down where a signal must land during training.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_sweep import submitit_plugin_installed
from zsbir import report
from zsbir.engine import preemption

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
PACE = Path(__file__).resolve().parent / "slurm_pace"
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")

# Every job: the smoke shrink, bit-reproducible, 16 steps (2 epochs of 8), last.pt after each step.
JOB = ["data=synthetic", "debug=smoke", "data.num_workers=0", "eval.before_training=false", "deterministic=true",
       "trainer.limit_train_batches=8", "trainer.ckpt_every_steps=1", "eval.grids.queries=0"]
# launcher=slurm_1gpu on a CPU node: no GPU, one CPU and a little memory per task.
SLURM_1GPU = ["launcher=slurm_1gpu", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
              "hydra.launcher.mem_gb=1"]
# The end of the job script in docs/reliability.md: requeue on exit 75, else end with the run's status.
REQUEUE_ON_75 = """status=$?
if [ $status -eq 75 ]; then scontrol requeue $SLURM_JOB_ID; fi
exit $status
"""
WAIT_S = 900  # bound on any one wait; smoke jobs take well under a minute on an idle 2-core machine


def why_no_slurm() -> str | None:
    if not submitit_plugin_installed():
        return 'the SLURM launcher is not installed: pip install "zsbir[slurm]"'
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd runs the jobs): run the tests as root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} not found): apt-get install slurm-wlm munge"
    return None


def generate_synthetic_once() -> None:
    """The benchmark the jobs train on, made here once instead of by several jobs at a time."""
    from hydra import compose, initialize_config_dir

    from zsbir._paths import config_dir
    from zsbir.data.synthetic import SyntheticSpec, ensure_synthetic

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        data = compose("train", overrides=JOB).data
    ensure_synthetic(data.cache_dir, SyntheticSpec(**data.synthetic))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, zsbir_cache) -> Iterator[dict]:
    """A running single-node SLURM; yields the environment for the launching processes; stopped afterwards."""
    reason = why_no_slurm()
    if reason:
        pytest.skip(reason)
    generate_synthetic_once()
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, f"scripts/slurm_local.sh start failed:\n{started.stdout}{started.stderr}"
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "ZSBIR_CACHE": str(zsbir_cache),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(PACE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    try:
        yield env
    finally:
        subprocess.run([str(SCRIPT), "stop", str(state)], capture_output=True, timeout=120)


def launch(env: dict, cwd: Path, *args: str, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zsbir.train", *args], cwd=cwd, env={**env, **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def sweep(env: dict, sweep_dir: Path, *overrides: str, extra_env: dict | None = None) -> subprocess.Popen:
    """`python -m zsbir.train -m launcher=slurm_1gpu ...` into `sweep_dir` (not waited for)."""
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    return launch(env, sweep_dir.parent, "-m", *JOB, *SLURM_1GPU, f"hydra.sweep.dir={sweep_dir}",
                  f"paths.output_dir={sweep_dir.parent}", *overrides, extra_env=extra_env)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"the launcher did not finish within {WAIT_S} s:\n{output[-5000:]}")
    return process.returncode, output


def wait_for(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def array_job_ids(sweep_dir: Path) -> list[str]:
    """SLURM ids of a sweep's jobs, in job order, from submitit's folders: `<array id>_<index>`
    for a sweep of several jobs (beside the array's own folder `<array id>`), `<id>` for one."""
    folder = sweep_dir / ".submitit"
    names = [p.name for p in folder.iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name)] if folder.is_dir() else []
    tasks = sorted((n for n in names if "_" in n), key=lambda jid: int(jid.split("_")[1]))
    return tasks or names


def job_info(env: dict, job_id: str) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ...); finished jobs stay listed MinJobAge (5 min)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def saved_step(run_dir: Path) -> int:
    """The step of `run_dir`'s last.pt, -1 while there is none."""
    import torch

    try:
        return int(torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):  # absent, or being replaced
        return -1


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def same_result(a: dict, b: dict) -> bool:
    keys = ("test", "best_val", "steps", "epochs", "n_queries", "n_gallery")
    return {k: a[k] for k in keys} == {k: b[k] for k in keys}


@pytest.fixture(scope="module")
def sweeps(slurm, tmp_path_factory) -> dict:
    """Two sweeps at once: seeds 1 and 2 (the uninterrupted reference), and one whose second job fails."""
    root = tmp_path_factory.mktemp("sweeps")
    good = sweep(slurm, root / "seeds", "seed=1,2")
    bad = sweep(slurm, root / "broken", "seed=3", "optim.lr=0.001,-1")
    return {"seeds": (root / "seeds", *finish(good)), "broken": (root / "broken", *finish(bad))}


def test_a_two_job_sweep_runs_to_the_end_and_reports(sweeps):
    sweep_dir, rc, output = sweeps["seeds"]
    assert rc == 0, output[-5000:]
    jobs = job_dirs(sweep_dir)
    assert [job.name for job in jobs] == ["0_synthetic_triplet_baseline_seed1", "1_synthetic_triplet_baseline_seed2"]
    for job in jobs:
        assert metrics(job)["steps"] == 16 and not (job / "FAILED").exists()
    assert len(array_job_ids(sweep_dir)) == 2  # one SLURM array task per sweep job
    text, notes = report.make_report([sweep_dir], fmt="md")
    assert "| triplet_baseline | " in text and "(n=2)" in text, text


def test_a_failed_job_is_reported_and_does_not_stop_the_others(sweeps):
    sweep_dir, rc, output = sweeps["broken"]
    assert rc == 1, output[-5000:]
    ok, failed = job_dirs(sweep_dir)
    assert metrics(ok)["steps"] == 16
    assert "optim.lr=-1: must be a finite number > 0" in (failed / "FAILED").read_text().splitlines()[0]
    assert f"1 job(s) of the sweep in {sweep_dir} failed (the others ran)" in output
    assert f"{failed.name}: " in output


WORKERS_IGNORE_STOP_SIGNALS = hasattr(preemption, "ignore_stop_signals")


@pytest.mark.parametrize("workers", [
    0,
    pytest.param(1, marks=pytest.mark.skipif(not WORKERS_IGNORE_STOP_SIGNALS, reason=(
        "DataLoader workers die of the stop signal sent to the whole job step until they leave it to the "
        "main process (zsbir.engine.preemption.ignore_stop_signals)"))),
], ids=["no-workers", "1-worker"])
def test_preempted_jobs_are_requeued_resume_and_match_the_uninterrupted_run(slurm, sweeps, tmp_path, workers):
    """`scancel -s USR1` to job 0 and `scancel -s TERM` to job 1 of a sweep, during training."""
    signals = ("USR1", "TERM")
    reference_dir, rc, _ = sweeps["seeds"]
    assert rc == 0
    sweep_dir = tmp_path / "preempted"
    # Steps take >= 0.5 s in the first run of each job only: the signal lands during training.
    # The data do not depend on the number of workers: the reference ran without.
    launcher = sweep(slurm, sweep_dir, "seed=1,2", f"data.num_workers={workers}",
                     extra_env={"ZSBIR_TEST_STEP_DELAY_S": "0.5", "ZSBIR_TEST_SLOW_RESTARTS": "1"})
    ids = wait_for(lambda: len(array_job_ids(sweep_dir)) == 2 and array_job_ids(sweep_dir), "the 2 SLURM jobs")
    for job_id, job_num, sig in zip(ids, (0, 1), signals):
        run_dir = wait_for(lambda: next(iter(sweep_dir.glob(f"{job_num}_*")), None), f"job {job_id}'s run directory")
        wait_for(lambda: saved_step(run_dir) >= 1, f"job {job_id}'s first last.pt")
        # scancel -s signals every process of the job's steps (not the batch shell), as preemption does.
        subprocess.run(["scancel", "-s", sig, job_id], env=slurm, check=True, timeout=60)
    rc, output = finish(launcher)
    assert rc == 0, output[-5000:]
    for job_id, run_dir, reference, sig in zip(ids, job_dirs(sweep_dir), job_dirs(reference_dir), signals):
        log = (run_dir / "train.log").read_text()
        assert f"received SIG{sig}" in log and "handing over to the launcher's SIGUSR2 handler (requeue)" in log, log
        assert "resumed from" in log, log
        assert job_info(slurm, job_id).get("Restarts") == "1"
        assert same_result(metrics(run_dir), metrics(reference)), (metrics(run_dir), metrics(reference))


def test_a_cancelled_job_is_not_requeued(slurm, tmp_path):
    """`scancel <job>` also sends SIGTERM, and SLURM would requeue even a cancelled job: it must end."""
    sweep_dir = tmp_path / "cancelled"
    launcher = sweep(slurm, sweep_dir, "seed=1", extra_env={"ZSBIR_TEST_STEP_DELAY_S": "0.5"})
    try:
        [job_id] = wait_for(lambda: array_job_ids(sweep_dir), "the SLURM job")
        run_dir = wait_for(lambda: next(iter(sweep_dir.glob("0_*")), None), "the run directory")
        wait_for(lambda: saved_step(run_dir) >= 1, "the first last.pt")
        subprocess.run(["scancel", job_id], env=slurm, check=True, timeout=60)
        wait_for(lambda: "not requeued" in (run_dir / "train.log").read_text(), "the trainer's stop", timeout=120)
        # The job leaves COMPLETING once its processes are gone: CANCELLED, or PENDING had it been requeued.
        info = wait_for(lambda: (i := job_info(slurm, job_id)).get("JobState") not in ("RUNNING", "COMPLETING") and i,
                        "the job's end", timeout=120)
        assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
        assert "the SLURM job is ending (JobState=COMPLETING" in (run_dir / "train.log").read_text()
    finally:
        launcher.kill()  # without accounting it cannot learn that a job without a result ended
        launcher.communicate()


def test_a_job_past_its_time_limit_is_requeued_until_max_num_timeout(slurm, tmp_path):
    """2-minute jobs warned 30 s ahead (SLURM sends the signal up to a minute earlier)."""
    limits = ["hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=30"]
    slow = {"ZSBIR_TEST_STEP_DELAY_S": "8"}  # 16 steps of >= 8 s cannot finish before the warning
    # Slow in its first run only: requeued once, finishes in the second run.
    once = sweep(slurm, tmp_path / "once", "seed=1", *limits, "hydra.launcher.max_num_timeout=2",
                 extra_env={**slow, "ZSBIR_TEST_SLOW_RESTARTS": "1"})
    # Slow in every run, no requeue allowed after a time-out: stops as failed after the first run.
    never = sweep(slurm, tmp_path / "never", "seed=2", *limits, "hydra.launcher.max_num_timeout=0", extra_env=slow)
    (once_rc, once_out), (never_rc, never_out) = finish(once), finish(never)

    assert once_rc == 0, once_out[-5000:]
    [run_dir] = job_dirs(tmp_path / "once")
    log = (run_dir / "train.log").read_text()
    assert "received SIGUSR2" in log and "resumed from" in log and metrics(run_dir)["steps"] == 16, log
    [job_id] = array_job_ids(tmp_path / "once")
    assert int(job_info(slurm, job_id).get("Restarts", 0)) >= 1
    submitit_log = "".join(p.read_text() for p in (tmp_path / "once" / ".submitit" / job_id).glob("*_log.*"))
    assert "this job is timed-out" in submitit_log and "(1 remaining timeouts)" in submitit_log, submitit_log

    assert never_rc == 1, never_out[-5000:]
    [run_dir] = job_dirs(tmp_path / "never")
    assert "timed-out too many times" in (run_dir / "FAILED").read_text().splitlines()[0]
    assert saved_step(run_dir) >= 1 and not (run_dir / "metrics.json").exists()


def test_the_documented_sbatch_script_requeues_on_exit_75_and_resumes(slurm, sweeps, tmp_path):
    reference = job_dirs(sweeps["seeds"][0])[0]  # seed 1
    run_dir = tmp_path / "run"
    overrides = " ".join([*JOB, "seed=1", f"hydra.run.dir={run_dir}"])
    docs = "\n".join(line.strip() for line in (REPO / "docs" / "reliability.md").read_text().splitlines())
    assert REQUEUE_ON_75 in docs  # the end of the job script the docs show
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/slurm-%j.out\n#SBATCH --cpus-per-task=1\n"
                      f"srun {sys.executable} -m zsbir.train {overrides}\n{REQUEUE_ON_75}")
    pace = {"ZSBIR_TEST_STEP_DELAY_S": "0.5", "ZSBIR_TEST_SLOW_RESTARTS": "1"}
    job_id = subprocess.run(["sbatch", "--parsable", str(script)], env={**slurm, **pace}, cwd=tmp_path, check=True,
                            capture_output=True, text=True).stdout.strip()
    wait_for(lambda: saved_step(run_dir) >= 1, "the first last.pt")
    subprocess.run(["scancel", "-s", "USR1", job_id], env=slurm, check=True, timeout=60)
    info = wait_for(lambda: (i := job_info(slurm, job_id)).get("JobState") in ("COMPLETED", "FAILED", "TIMEOUT",
                                                                                 "CANCELLED") and i, "the job's end")
    log = (run_dir / "train.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)
    assert "PreemptedError: stopped by SIGUSR1" in log and "resumed from" in log, log
    assert same_result(metrics(run_dir), metrics(reference))


def test_a_two_task_step_is_one_process_group_and_matches_a_single_process_evaluation(slurm, tmp_path):
    sweep_dir = tmp_path / "ddp"
    rc, output = finish(sweep(slurm, sweep_dir, "seed=1", "hydra.launcher.tasks_per_node=2"))
    assert rc == 0, output[-5000:]
    [run_dir] = job_dirs(sweep_dir)  # both tasks trained in one run directory
    result = metrics(run_dir)
    assert result["world_size"] == 2 and result["steps"] == 16  # 8 batches per epoch on each rank (the cap)
    assert "distributed: 2 processes (gloo, slurm)" in (run_dir / "train.log").read_text()
    evaluated = subprocess.run([sys.executable, "-m", "zsbir.eval", f"run_dir={run_dir}", "ckpt=best",
                                "eval.grids.queries=0"], env=slurm, capture_output=True, text=True, timeout=WAIT_S)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    single = json.loads((run_dir / "eval" / "synthetic-best" / "eval_metrics.json").read_text())["test"]
    for key, value in result["test"].items():
        assert single[key] == pytest.approx(value, abs=1e-6), key
