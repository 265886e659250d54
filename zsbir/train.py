"""Train and evaluate: `python -m zsbir.train [group=option ...] [key=value ...]`.

Examples:
    python -m zsbir.train                                   # synthetic benchmark, CPU-friendly
    python -m zsbir.train model=clip_prompt data=sketchy
    python -m zsbir.train -m experiment=sake,dsn data=sketchy,tuberlin seed=1,2,3
"""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from zsbir._paths import config_dir
from zsbir.errors import ZsbirError

log = logging.getLogger("zsbir.train")


def run(cfg: DictConfig, run_dir: str) -> dict:
    from zsbir.engine.trainer import Trainer

    return Trainer(cfg, run_dir).fit()


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        result = run(cfg, HydraConfig.get().runtime.output_dir)
    except ZsbirError as err:  # a user-fixable problem: its message, no traceback
        # a preemption (exit 75) is the expected end of a requeued job's slice, not an error
        log.log(logging.ERROR if err.exit_code == 1 else logging.WARNING, "%s: %s", type(err).__name__, err)
        sys.exit(err.exit_code)  # 1; 75 (EXIT_PREEMPTED) when stopped by SIGTERM/SIGUSR1 to be requeued
    return float(result["test"]["map_all"])


if __name__ == "__main__":
    main()
