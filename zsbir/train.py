"""Train and evaluate: `python -m zsbir.train [group=option ...] [key=value ...]`.

Examples:
    python -m zsbir.train                                   # synthetic benchmark, CPU-friendly
    python -m zsbir.train model=clip_prompt data=sketchy
    python -m zsbir.train -m experiment=sake,dsn data=sketchy,tuberlin seed=1,2,3
    torchrun --nproc_per_node 4 -m zsbir.train model=clip_prompt data=sketchy   # 4 GPUs (docs/distributed.md)

In a sweep (`-m`) one failed job does not stop the others: its error (with traceback) goes
to the job's `train.log` and to `<job dir>/FAILED`, the sweep goes on, and the process
exits non-zero at the end if any job failed (`SweepFailureCallback`, registered in
configs/hydra/default.yaml). A single run (no `-m`) fails immediately, as before.
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from zsbir._paths import config_dir
from zsbir.errors import ZsbirError

log = logging.getLogger("zsbir.train")

FAILED_MARKER = "FAILED"


def release_memory() -> None:
    """Between the jobs of a sweep (one process runs them all): drop the last job's tensors."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class MultiProcessLaunchError(ZsbirError):
    """Several processes were started for one job, but they do not form a process group."""


def check_process_group() -> None:
    """Refuse N uncoordinated copies of one job (torchrun, or a SLURM step with N tasks).

    Without an initialised process group every copy would believe it is rank 0 and write the
    same run directory.
    """
    import torch.distributed

    launched = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_STEP_NUM_TASKS") or 1)
    if launched > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise MultiProcessLaunchError(
            f"this job was started as {launched} processes (WORLD_SIZE / SLURM_STEP_NUM_TASKS) but no "
            "torch.distributed process group is initialised, so each would train alone and write the same "
            "run directory. Use one process per job (launcher=slurm_1gpu, or python without torchrun)"
        )


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    from zsbir.engine.trainer import Trainer

    check_process_group()
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir)
        return trainer.fit()
    except BaseException:
        if trainer is not None and trainer.tracker is not None:
            trainer.tracker.finish(exit_code=1)  # mark the W&B run failed instead of leaving it open
        raise


def run_distributed(cfg: DictConfig, run_dir: str | Path) -> dict:
    """`run` inside the process group the launcher describes (a plain `run` for one process).

    Every rank trains in rank 0's run directory; only rank 0 writes there and logs INFO.
    """
    from zsbir.engine import distributed as dist

    dist.init_distributed(cfg)
    try:
        run_dir = dist.broadcast_from_main(run_dir)
        if not dist.is_main():
            logging.getLogger("zsbir").setLevel(logging.WARNING)
        return run(cfg, run_dir)
    finally:
        dist.destroy_distributed()


def worker_rank_overrides(argv: list[str]) -> list[str]:
    """Command line of a rank other than 0: Hydra output goes to a scratch folder, removed at exit.

    Every process of a multi-process launch runs Hydra, which would create a run directory
    per rank (time-stamped names differ) and write its config and log into it; the run
    directory is rank 0's (broadcast in `run_distributed`).
    """
    if not any(key in os.environ for key in ("RANK", "SLURM_PROCID")):
        return argv  # one process: no need to import torch yet (a refused launch fails in under a second)
    from zsbir.engine.distributed import launch_env

    launch = launch_env()
    if launch is None or launch.rank == 0:
        return argv
    scratch = tempfile.mkdtemp(prefix=f"zsbir-rank{launch.rank}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    kept = [a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [*kept, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


def record_failure(run_dir: Path, err: BaseException) -> None:
    """Log a failed sweep job and leave `<run_dir>/FAILED` (first line: the error) for the sweep's summary."""
    if isinstance(err, ZsbirError):
        log.error("job failed: %s: %s", type(err).__name__, err)
    else:
        log.exception("job failed")
    summary = " ".join(f"{type(err).__name__}: {err}".split())  # one line, for the sweep's summary
    details = "".join(traceback.format_exception(err))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED_MARKER).write_text(f"{summary}\n\n{details}")


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        result = run_distributed(cfg, run_dir)
    except ZsbirError as err:  # a user-fixable problem: its message, no traceback
        if sweeping and err.exit_code == 1:
            record_failure(run_dir, err)
            return None
        # a preemption (exit 75) is the expected end of a requeued job's slice, not an error
        log.log(logging.ERROR if err.exit_code == 1 else logging.WARNING, "%s: %s", type(err).__name__, err)
        sys.exit(err.exit_code)  # 1; 75 (EXIT_PREEMPTED) when stopped by SIGTERM/SIGUSR1 to be requeued
    except Exception as err:
        if not sweeping:
            raise
        record_failure(run_dir, err)
        return None
    finally:
        release_memory()
    (run_dir / FAILED_MARKER).unlink(missing_ok=True)  # a re-run (SLURM requeue, resume) that succeeded
    return float(result["test"]["map_all"])


class SweepFailureCallback(Callback):
    """Sweep bookkeeping for `-m`: a sweep folder of its own, and a non-zero exit if any job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The default sweep folder is named to the microsecond; claiming it atomically turns the
        # remaining chance of two sweeps sharing one (same microsecond, another host) into an
        # error instead of jobs silently resuming each other's checkpoints. A folder the user
        # names (hydra.sweep.dir=...) may be reused on purpose: re-running a sweep resumes it.
        if any(o.startswith("hydra.sweep.dir=") for o in config.hydra.overrides.hydra):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            sweep_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise SystemExit(
                f"sweep folder {sweep_dir} already exists: another sweep started in the same microsecond. "
                "Launch again, or pass hydra.sweep.dir=<folder> to continue a sweep there on purpose"
            ) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = sorted(marker.parent for marker in sweep_dir.rglob(FAILED_MARKER))
        if not failed:
            return
        lines = [f"{len(failed)} job(s) of the sweep in {sweep_dir} failed (the others ran):"]
        for job_dir in failed:
            first_line = (job_dir / FAILED_MARKER).read_text().splitlines()[0]
            lines.append(f"  {job_dir.name}: {first_line}")
        lines.append("Details: <job dir>/FAILED and <job dir>/train.log. Re-run the same command with "
                     f"hydra.sweep.dir={sweep_dir} to retry them (finished jobs resume at their last step: no retraining).")
        print("\n".join(lines), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:
        from zsbir.config import refuse_renamed_keys

        refuse_renamed_keys(sys.argv[1:])
        sys.argv = [sys.argv[0], *worker_rank_overrides(sys.argv[1:])]
    except ZsbirError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
    main()
