"""Every config file in the tree composes, and every instantiable node instantiates."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from zsbir._paths import config_dir

CONFIGS = Path(config_dir())
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


ALL = [(g, o) for g in GROUPS if g not in ("hydra", "launcher") for o in options(g)]


def test_the_tree_has_the_documented_groups():
    for group in ("data", "model", "loss", "optim", "sched", "trainer", "logger", "paths", "hydra", "debug"):
        assert options(group), f"configs/{group}/ is empty"


def test_default_config_composes(compose_cfg):
    cfg = compose_cfg()
    assert cfg.data.name == "synthetic" and cfg.model.name == "small_cnn"
    assert list(cfg.loss) == ["triplet", "triplet_hard", "ce"] and cfg.model.cls_head and cfg.model.dsbn == "per_domain"
    OmegaConf.resolve(cfg)  # every interpolation resolves


def test_only_the_default_model_adds_the_seen_class_ce_term(compose_cfg):
    # small_cnn has a class head; models without one keep the triplet pair, and loss=[...] always wins
    assert list(compose_cfg("model=clip_prompt").loss) == ["triplet", "triplet_hard"]
    assert list(compose_cfg("model=resnet50").loss) == ["triplet", "triplet_hard"]
    assert list(compose_cfg("loss=[triplet]").loss) == ["triplet"]
    assert list(compose_cfg("debug=smoke").loss) == ["triplet", "triplet_hard", "ce"]


@pytest.mark.parametrize("group,option", ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_every_config_file_composes_and_instantiates(compose_cfg, group, option):
    override = f"loss=[{option}]" if group == "loss" else f"{group}={option}"
    cfg = compose_cfg(override, "debug=smoke")
    OmegaConf.resolve(cfg)
    if group == "model":
        from zsbir.models.encoder import build_encoder

        encoder = build_encoder(cfg.model, num_seen_classes=5)
        assert encoder.embed_dim > 0
    elif group == "loss":
        from zsbir.losses.base import build_loss_set

        assert option in build_loss_set(cfg.loss).terms
    elif group == "optim":
        import torch

        from zsbir.engine.optim import build_optimizer

        optimizer = build_optimizer(cfg.optim, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": cfg.optim.lr}])
        assert optimizer.param_groups[0]["lr"] == cfg.optim.lr
    elif group == "sched":
        import torch

        from zsbir.engine.optim import build_scheduler

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        build_scheduler(cfg.sched, optimizer, total_steps=10)


def test_overrides_work_as_usual(compose_cfg):
    cfg = compose_cfg("trainer.max_epochs=3", "loss=[triplet,ce]", "loss.ce.weight=0.5", "model.cls_head=true")
    assert cfg.trainer.max_epochs == 3
    assert cfg.loss.ce.weight == 0.5 and cfg.loss.triplet.weight == 1.0
