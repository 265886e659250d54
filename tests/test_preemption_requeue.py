"""Which handler a stopped run hands over to (zsbir/engine/preemption.py), without a cluster.

The same paths on a real SLURM: tests/test_slurm_real.py.
"""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from zsbir.engine import preemption
from zsbir.engine.preemption import PreemptedError, PreemptionHandler


@pytest.fixture
def submitit_job(monkeypatch):
    """This process as a submitit job: stand-ins for submitit's handlers (requeue on SIGUSR2, ignore SIGTERM)."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    calls = []
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(("requeue", signum)))
    signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(("bypass", signum)))
    yield calls
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2], ids=lambda s: s.name)
def test_in_a_submitit_job_every_stop_signal_ends_in_submitits_requeue(submitit_job, sig):
    handler = PreemptionHandler()
    assert signal.SIGUSR2 in handler.signals  # submitit's own signal waits for the save too
    with handler:
        os.kill(os.getpid(), sig)
        assert handler.received == sig and submitit_job == []  # only recorded while training
        with pytest.raises(PreemptedError, match=f"stopped by {sig.name} at step 3"):
            handler.stop("at step 3")
    assert submitit_job == [("requeue", signal.SIGUSR2)]  # never submitit's SIGTERM bypass


def test_a_rank_stopped_by_another_ranks_signal_also_hands_over(submitit_job):
    handler = PreemptionHandler()
    with handler, pytest.raises(PreemptedError, match="a signal to another rank"):
        handler.stop("at step 3")
    assert submitit_job == [("requeue", signal.SIGUSR2)]


def test_submitits_preempt_signal_setting_is_followed(submitit_job, monkeypatch):
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert preemption.preemption_signals() == preemption.PREEMPTION_SIGNALS  # USR1 is one of them already
    signal.signal(signal.SIGUSR1, lambda signum, frame: submitit_job.append(("requeue", signum)))
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(PreemptedError):
            handler.stop("at step 1")
    assert submitit_job == [("requeue", signal.SIGUSR1)]


def test_outside_a_submitit_job_nothing_is_added(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert preemption.preemption_signals() == preemption.PREEMPTION_SIGNALS
    assert preemption.requeue_handler(signal.SIGTERM, {signal.SIGTERM: signal.SIG_DFL}) is None


@pytest.mark.parametrize("state, requeued", [("RUNNING", True), ("COMPLETING", False), ("CANCELLED", False)])
def test_only_a_job_slurm_still_runs_is_requeued(submitit_job, monkeypatch, state, requeued):
    """`scancel -s TERM` leaves the job RUNNING; `scancel <job>` (also SIGTERM) makes it COMPLETING."""
    monkeypatch.setattr(preemption, "slurm_job_state", lambda: state)
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(PreemptedError, match="stopped by SIGTERM"):
            handler.stop("at step 1")
    assert submitit_job == ([("requeue", signal.SIGUSR2)] if requeued else [])


def test_a_refused_requeue_stops_with_exit_75(submitit_job):
    def refuse(signum, frame):
        raise subprocess.CalledProcessError(1, ["scontrol", "requeue", "7"])

    signal.signal(signal.SIGUSR2, refuse)
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(PreemptedError) as stopped:
            handler.stop("at step 1")
    assert stopped.value.exit_code == 75


def test_slurm_job_state_reads_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\necho "JobId=$4 JobName=train UserId=root(0) JobState=CANCELLED Reason=None"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert preemption.slurm_job_state() is None  # not a SLURM job
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert preemption.slurm_job_state() == "CANCELLED"
    fake.write_text("#!/bin/sh\nexit 1\n")  # controller unreachable: unknown, the requeue is still tried
    assert preemption.slurm_job_state() is None


def test_ctrl_c_is_never_turned_into_a_requeue(submitit_job):
    requeue = signal.getsignal(signal.SIGUSR2)
    assert preemption.requeue_handler(signal.SIGINT, {signal.SIGUSR2: requeue}) is None
    assert preemption.requeue_handler(signal.SIGTERM, {signal.SIGUSR2: requeue}) == (signal.SIGUSR2, requeue)
