"""Embed a gallery into a FAISS index: `python -m zsbir.index run_dir=<run> [source=...|images=<folder>]`.

Options: configs/index.yaml; how it works: zsbir/search/build.py and docs/search.md.
"""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from zsbir._paths import config_dir
from zsbir.config import refuse_renamed_keys_on_command_line
from zsbir.errors import exit_on_user_error

log = logging.getLogger("zsbir.index")


def run_index(cfg: DictConfig):
    from zsbir.search.build import build_index, params_from_cfg
    from zsbir.search.model import load_run_model

    model = load_run_model(cfg.run_dir, str(cfg.ckpt), str(cfg.device), cfg.precision)
    data_cfg = None
    if cfg.get("data"):
        data_cfg = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    return build_index(model, source=str(cfg.source), images=cfg.images, data_cfg=data_cfg,
                       data_name=str(cfg.data.name) if cfg.get("data") else None, name=cfg.name,
                       params=params_from_cfg(cfg.index), rebuild=bool(cfg.rebuild), batch_size=cfg.batch_size,
                       num_workers=int(cfg.num_workers), progress=bool(cfg.progress))


@hydra.main(config_path=config_dir(), config_name="index", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: run_index(cfg), log)


if __name__ == "__main__":
    refuse_renamed_keys_on_command_line()
    main()
