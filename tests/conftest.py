"""Test-wide settings: no network, offline W&B, one shared synthetic-benchmark cache."""
from __future__ import annotations

import os
from pathlib import Path

# Before anything imports timm / open_clip / huggingface_hub / wandb.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

# The public split lists live beside the repository (../shared/splits); ZSBIR_SHARED_SPLITS points
# elsewhere (e.g. a git worktree that is not beside ../shared).
SHARED_SPLITS = Path(os.environ.get("ZSBIR_SHARED_SPLITS") or Path(__file__).resolve().parents[2] / "shared" / "splits")


@pytest.fixture(scope="session", autouse=True)
def zsbir_cache(tmp_path_factory) -> Path:
    """One cache folder per test session, so the synthetic benchmark is generated once."""
    cache = Path(os.environ.get("ZSBIR_TEST_CACHE") or tmp_path_factory.mktemp("zsbir_cache"))
    os.environ["ZSBIR_CACHE"] = str(cache)
    return cache


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(*overrides) -> the composed `train` config with outputs under tmp_path."""
    from hydra import compose, initialize_config_dir

    from zsbir._paths import config_dir

    def _compose(*overrides: str, config_name: str = "train"):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name=config_name, overrides=[f"paths.output_dir={tmp_path}/outputs", *overrides])

    return _compose


@pytest.fixture
def shared_splits() -> Path:
    if not SHARED_SPLITS.is_dir():
        pytest.skip(f"the public split files are not available at {SHARED_SPLITS}")
    return SHARED_SPLITS
