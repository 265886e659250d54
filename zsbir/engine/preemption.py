"""Preemption: SIGTERM / SIGUSR1 make a run save `last.pt` and stop cleanly.

SLURM sends SIGTERM when it preempts or cancels a job (then SIGKILL after `KillWait`,
30 s by default), and SIGUSR1 ahead of the time limit when the job asks for it
(`#SBATCH --signal=USR1@120`). While training, the trainer only records the signal in
the handler; after the current optimisation step it saves `last.pt` and raises
`PreemptedError`, which the entry point turns into exit code `EXIT_PREEMPTED` (75,
EX_TEMPFAIL: "try again later"). A job script requeues on that code, and re-running the
same command in the same run directory resumes:

    srun python -m zsbir.train ... hydra.run.dir=$RUN_DIR
    status=$?
    if [ $status -eq 75 ]; then scontrol requeue $SLURM_JOB_ID; fi
    exit $status

When a launcher had installed its own handler for the signal, that handler is called
after `last.pt` is saved instead of raising, so the launcher's requeue still happens.
Inside a submitit job (`launcher=slurm_*`) every stop signal -- SIGTERM, SIGUSR1 and
submitit's own (SIGUSR2, `SUBMITIT_PREEMPT_SIGNAL`) -- ends in submitit's
checkpoint-and-requeue handler once `last.pt` is saved: submitit only binds that handler to
its own signal and ignores SIGTERM, so a `scancel -s USR1|TERM` would otherwise end the job
with exit 75 and no requeue, and the launching process would wait for a result that never
comes (`requeue_handler`).

SIGINT (Ctrl-C) is handled the same way: `last.pt` is saved and the run stops with one
line and exit code 130; a second Ctrl-C stops at once (KeyboardInterrupt). `scancel`,
preemption and a terminal's Ctrl-C signal the whole process group, DataLoader workers
included: workers ignore these signals (`ignore_stop_signals`, their `worker_init_fn`)
and are stopped by the main process once it has saved, instead of dying first and
turning the clean stop into "DataLoader worker ... is killed by signal".
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Callable

from zsbir.errors import ZsbirError

log = logging.getLogger("zsbir.train")

EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT (128 + 2)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """In a DataLoader worker (also usable as its `worker_init_fn`): leave SIGTERM/SIGUSR1/SIGINT,
    and submitit's time-limit signal inside a submitit job, to the main process, which saves and
    then shuts the workers down (they also exit when the main process dies)."""
    for sig in preemption_signals():
        signal.signal(sig, signal.SIG_IGN)


class PreemptedError(ZsbirError):
    """The run was asked to stop by a signal and saved `last.pt`; re-run the same command to resume."""

    exit_code = EXIT_PREEMPTED


class PreemptionHandler:
    """Context manager: while inside, the preemption signals only set `received`.

    Handlers are installed only in the main thread (Python delivers signals there) and
    the previous ones are restored on exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] | None = None):
        self.signals = signals if signals is not None else preemption_signals()
        self.received: signal.Signals | None = None
        self._announced = False
        self.previous: dict[signal.Signals, Callable | int | None] = {}

    def _record(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
        if self.received is None:
            # No logging here: a handler that writes to a stream the interrupted code was writing
            # to fails with "reentrant call"; `requested` reports the signal after the step.
            self.received = signal.Signals(signum)

    def requested(self) -> bool:
        """Whether a stop signal arrived; says so in the log the first time it is seen."""
        if self.received is not None and not self._announced:
            self._announced = True
            log.warning("received %s: saving last.pt and stopping", self.received.name)
        return self.received is not None

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous.clear()

    def stop(self, where: str) -> None:
        """Called once the state is saved: hand over to the launcher's handler, or raise PreemptedError."""
        sig = self.received  # None on a rank that stops because another rank was signalled
        hand_over = requeue_handler(sig, self.previous)
        self.__exit__()
        if hand_over is not None:
            call_launcher_handler(hand_over, where)
        cause = sig.name if sig else "a signal to another rank"
        if sig == signal.SIGINT:
            error = PreemptedError(f"stopped by {cause} {where}. Re-run the same command with the same "
                                   "run directory (hydra.run.dir=...) to resume")
            error.exit_code = EXIT_INTERRUPTED
            raise error
        raise PreemptedError(
            f"stopped by {cause} {where}. Re-run the same command with the same run directory "
            f"(hydra.run.dir=...) to resume; exit code {EXIT_PREEMPTED} means 'preempted, requeue me'"
        )


def submitit_signal() -> signal.Signals | None:
    """The signal submitit's requeue handler is bound to, when this process is a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    # submitit's default and its override (JobEnvironment.USR_SIG); hydra-submitit-launcher's
    # signal_delay_s asks SLURM to send it (--signal=USR2@<delay>) before the time limit.
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", None)


def preemption_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM and SIGUSR1, plus submitit's requeue signal inside a submitit job.

    Catching submitit's signal too means its handler runs after `last.pt` is saved instead of
    in the middle of a step (which would lose the work since the last periodic save).
    """
    extra = submitit_signal()
    return PREEMPTION_SIGNALS + ((extra,) if extra is not None and extra not in PREEMPTION_SIGNALS else ())


def requeue_handler(received: signal.Signals | None, previous: dict) -> tuple[signal.Signals, Callable] | None:
    """The launcher's handler to call once `last.pt` is saved, with the signal to pass it.

    In a submitit job: submitit's checkpoint-and-requeue, whichever signal stopped the run
    (also on a rank stopped by another rank's signal). Otherwise the handler that was
    installed before training for the signal received, if any.
    """
    if received == signal.SIGINT:  # Ctrl-C: the user stops the run, nothing to requeue
        return None
    requeue_sig = submitit_signal()
    if requeue_sig is not None and callable(previous.get(requeue_sig)):
        return requeue_sig, previous[requeue_sig]
    if received is not None and callable(previous.get(received)):
        return received, previous[received]
    return None


def call_launcher_handler(hand_over: tuple[signal.Signals, Callable], where: str) -> None:
    """Run the launcher's handler; a refused requeue falls back to exit 75 (PreemptedError).

    submitit's handler requeues the job (`scontrol requeue`) and exits the process; it raises
    when the job may not be requeued any more (time-outs beyond max_num_timeout), which ends
    the job as failed. Only a job SLURM still runs is requeued: a signal alone (`scancel -s`,
    the time-limit warning) leaves it RUNNING, while a cancelled job (`scancel <job>`, which
    sends SIGTERM too) is already COMPLETING and meant to end -- `scontrol requeue` would
    still bring it back. A job SLURM preempts with PreemptMode=REQUEUE is requeued by SLURM.
    """
    sig, handler = hand_over
    state = slurm_job_state()
    if state not in (None, "RUNNING"):
        log.warning("%s: the SLURM job is ending (JobState=%s: cancelled, or stopped by SLURM itself): not requeued",
                    where, state)
        return
    log.warning("%s: handing over to the launcher's %s handler (requeue)", where, sig.name)
    try:
        handler(int(sig), None)
    except subprocess.CalledProcessError as err:
        log.warning("the launcher could not requeue the job (%s); stopping without a requeue", err)


def slurm_job_state() -> str | None:
    """This SLURM job's state (RUNNING, CANCELLED, ...) from `scontrol`; None outside SLURM or when unknown."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((field.split("=", 1)[1] for field in out.split() if field.startswith("JobState=")), None)
