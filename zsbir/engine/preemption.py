"""Preemption: SIGTERM / SIGUSR1 make a run save `last.pt` and stop cleanly.

SLURM sends SIGTERM when it preempts or cancels a job (then SIGKILL after `KillWait`,
30 s by default), and SIGUSR1 ahead of the time limit when the job asks for it
(`#SBATCH --signal=USR1@120`). While training, the trainer only records the signal in
the handler; after the current optimisation step it saves `last.pt` and raises
`PreemptedError`, which the entry point turns into exit code `EXIT_PREEMPTED` (75,
EX_TEMPFAIL: "try again later"). A job script requeues on that code, and re-running the
same command in the same run directory resumes:

    srun python -m zsbir.train ... hydra.run.dir=$RUN_DIR
    [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID

When a launcher had installed its own handler for the signal (submitit does, for its
checkpoint-and-requeue), that handler is called after `last.pt` is saved instead of
raising, so the launcher's requeue still happens.

SIGINT (Ctrl-C) is handled the same way: `last.pt` is saved and the run stops with one
line and exit code 130; a second Ctrl-C stops at once (KeyboardInterrupt). `scancel`,
preemption and a terminal's Ctrl-C signal the whole process group, DataLoader workers
included: workers ignore these signals (`ignore_stop_signals`, their `worker_init_fn`)
and are stopped by the main process once it has saved, instead of dying first and
turning the clean stop into "DataLoader worker ... is killed by signal".
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

from zsbir.errors import ZsbirError

log = logging.getLogger("zsbir.train")

EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT (128 + 2)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals() -> None:
    """In a DataLoader worker: leave SIGTERM/SIGUSR1/SIGINT to the main process, which saves and
    then shuts the workers down (they also exit when the main process dies)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PreemptedError(ZsbirError):
    """The run was asked to stop by a signal and saved `last.pt`; re-run the same command to resume."""

    exit_code = EXIT_PREEMPTED


class PreemptionHandler:
    """Context manager: while inside, the preemption signals only set `received`.

    Handlers are installed only in the main thread (Python delivers signals there) and
    the previous ones are restored on exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.signals = signals
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
        previous = self.previous.get(sig) if sig else None
        self.__exit__()
        # Python's own Ctrl-C handler (KeyboardInterrupt) is not a launcher's: ours replaces it.
        if callable(previous) and previous is not signal.default_int_handler:
            log.warning("%s: handing over to the previously installed %s handler", where, sig.name)
            previous(int(sig), None)
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
