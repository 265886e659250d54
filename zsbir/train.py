"""Train and evaluate: `python -m zsbir.train [group=option ...] [key=value ...]`.

Examples:
    python -m zsbir.train                                   # synthetic benchmark, CPU-friendly
    python -m zsbir.train model=clip_prompt data=sketchy
    python -m zsbir.train -m experiment=sake,dsn data=sketchy,tuberlin seed=1,2,3
    torchrun --nproc_per_node 4 -m zsbir.train model=clip_prompt data=sketchy   # 4 GPUs (docs/distributed.md)
"""
from __future__ import annotations

import atexit
import logging
import shutil
import sys
import tempfile

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from zsbir._paths import config_dir
from zsbir.errors import ZsbirError

log = logging.getLogger("zsbir.train")


def run(cfg: DictConfig, run_dir: str) -> dict:
    from zsbir.engine.trainer import Trainer

    return Trainer(cfg, run_dir).fit()


def run_distributed(cfg: DictConfig, run_dir: str) -> dict:
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


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        result = run_distributed(cfg, HydraConfig.get().runtime.output_dir)
    except ZsbirError as err:
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(1)
    return float(result["test"]["map_all"])


def worker_rank_overrides(argv: list[str]) -> list[str]:
    """Command line of a rank other than 0: Hydra output goes to a scratch folder, removed at exit.

    Every process of a multi-process launch runs Hydra, which would create a run directory
    per rank (time-stamped names differ) and write its config and log into it; the run
    directory is rank 0's (broadcast in `run_distributed`).
    """
    from zsbir.engine.distributed import launch_env

    launch = launch_env()
    if launch is None or launch.rank == 0:
        return argv
    scratch = tempfile.mkdtemp(prefix=f"zsbir-rank{launch.rank}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    kept = [a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [*kept, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


if __name__ == "__main__":
    try:
        sys.argv = [sys.argv[0], *worker_rank_overrides(sys.argv[1:])]
    except ZsbirError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
    main()
