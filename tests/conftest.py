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

from ci_guard import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401  (hooks: a skip fails in CI)

pytest_plugins = ["pytester"]

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


class WandbCalls:
    """The public `wandb.Run` calls of a test, in order, with the run they went to.

    Recorded by the `wandb_calls` fixture, which wraps `Run.log`, `Run.define_metric` and
    `Run.finish` and passes every call on to W&B (tests/test_tracking.py says why). At each
    `finish` it also reads the run's `summary` and `config` (W&B's public views of what it
    stored), since a finished run no longer serves them.
    """

    def __init__(self):
        self.logged: list[tuple[str, dict]] = []  # (run id, data)
        self.metrics: dict[str, dict] = {}  # metric name -> define_metric keyword arguments
        self.finished: list[dict] = []  # {"id", "exit_code", "summary", "config"} per finish() call

    def history(self, run_id: str | None = None) -> list[dict]:
        return [data for rid, data in self.logged if run_id in (None, rid)]


def _plain(value):
    """W&B's summary / config views (nested mappings) as plain dicts."""
    return {key: _plain(value[key]) for key in value.keys()} if hasattr(value, "keys") else value


@pytest.fixture
def wandb_calls(monkeypatch) -> WandbCalls:
    import wandb

    calls = WandbCalls()
    log, define_metric, finish = wandb.Run.log, wandb.Run.define_metric, wandb.Run.finish

    def spy_log(self, data, *args, **kwargs):
        calls.logged.append((self.id, dict(data)))
        return log(self, data, *args, **kwargs)

    def spy_define_metric(self, name, *args, **kwargs):
        calls.metrics[name] = kwargs
        return define_metric(self, name, *args, **kwargs)

    def spy_finish(self, exit_code=None, *args, **kwargs):
        calls.finished.append({"id": self.id, "exit_code": exit_code, "summary": _plain(self.summary),
                               "config": _plain(self.config)})
        return finish(self, exit_code, *args, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", spy_log)
    monkeypatch.setattr(wandb.Run, "define_metric", spy_define_metric)
    monkeypatch.setattr(wandb.Run, "finish", spy_finish)
    return calls
