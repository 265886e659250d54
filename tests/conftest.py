"""Test-wide settings: no network, offline W&B, one shared synthetic-benchmark cache."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

# Before anything imports timm / open_clip / huggingface_hub / wandb.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

# The public split files: ../shared/splits beside the repository (CI), or ZSBIR_SHARED_SPLITS
# (a checkout elsewhere, e.g. a git worktree).
SHARED_SPLITS = Path(os.environ.get("ZSBIR_SHARED_SPLITS") or Path(__file__).resolve().parents[2] / "shared" / "splits")


@pytest.fixture(scope="session", autouse=True)
def zsbir_cache(tmp_path_factory) -> Path:
    """One cache folder per test session, so the synthetic benchmark is generated once."""
    cache = Path(os.environ.get("ZSBIR_TEST_CACHE") or tmp_path_factory.mktemp("zsbir_cache"))
    os.environ["ZSBIR_CACHE"] = str(cache)
    return cache


@pytest.fixture(autouse=True)
def no_leaked_child_processes():
    """A test must not leave worker processes behind (DataLoader workers ignore SIGTERM, so at exit
    multiprocessing would wait for them forever: the suite would print its summary and never end).
    Leftovers are killed and the test fails, naming them."""
    before = set(multiprocessing.active_children())
    yield
    leaked = [p for p in multiprocessing.active_children() if p not in before]
    for process in leaked:
        process.kill()
        process.join(10)
    assert not leaked, f"the test left child processes running (killed now): {leaked}"


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
