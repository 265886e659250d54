"""Test harness for tests/test_slurm_real.py: slows training steps down inside SLURM jobs.

Python imports `sitecustomize` at start-up from PYTHONPATH; the SLURM tests put this folder
there. With ZSBIR_TEST_STEP_DELAY_S set, every training step sleeps that long first, so a
signal sent "during training" lands during training on a fast and on a loaded machine
alike, and a job outlasts its time limit on purpose. ZSBIR_TEST_SLOW_RESTARTS=N slows only
the first N runs of a job (SLURM_RESTART_COUNT < N; a requeued run then goes at full speed).
The sleep changes no result: it touches neither the data nor any random generator.
"""
import os

_delay = float(os.environ.get("ZSBIR_TEST_STEP_DELAY_S") or 0)
_slow_runs = int(os.environ.get("ZSBIR_TEST_SLOW_RESTARTS") or 1_000_000)

if _delay > 0 and int(os.environ.get("SLURM_RESTART_COUNT") or 0) < _slow_runs:
    import functools
    import time

    from zsbir.engine.trainer import Trainer

    _train_step = Trainer.train_step

    @functools.wraps(_train_step)
    def _paced_train_step(self, batch):
        time.sleep(_delay)
        return _train_step(self, batch)

    Trainer.train_step = _paced_train_step
