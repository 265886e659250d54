"""Weights & Biases tracking on top of the local log (`logger=wandb`).

Everything is first written to `<run_dir>/log.jsonl` by the local `Tracker`; W&B is an
extra copy. A W&B failure (no network, quota, a bug in the client) must never stop a
training run: every W&B call goes through `_guarded`, which logs the first error as a
warning and turns the tracker into a local-only one.

Resuming: the W&B run id is part of `state_dict()`, which the trainer stores in its
checkpoints; a run resumed from `last.pt` re-opens the same W&B run (`resume="allow"`).
Charts use the trainer's step as their x-axis (`step` key, `define_metric(step_metric=)`)
rather than W&B's internal step, so the steps a resumed run repeats after its last
checkpoint are kept instead of being dropped as "out of order".
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

from omegaconf import OmegaConf

from zsbir.tracking.local import Tracker

log = logging.getLogger("zsbir.tracking")

# Keys W&B summarises by their best value (all retrieval metrics: higher is better).
BEST_IS_MAX_PREFIXES = ("map", "prec")


def scalar(value):
    """Tensors and numpy numbers as Python numbers (NaN stays a float: W&B charts it as a gap)."""
    return value.item() if hasattr(value, "item") else value


def filter_keys(cfg) -> dict:
    """Flat config keys for filtering and grouping runs in the W&B UI and in `zsbir.report`."""
    return {
        "method": cfg.get("method"),
        "model": cfg.model.get("name"),
        "dataset": cfg.data.get("name"),
        "split": cfg.data.get("split_dir"),
        "seed": int(cfg.seed),
        "protocol": str(cfg.eval.protocol),
        "per_class": bool(cfg.eval.per_class),
    }


def summarise_best(key: str) -> bool:
    """`val/map_all` -> True; `val/n_queries`, `loss` -> False."""
    return "/" in key and key.rsplit("/", 1)[1].startswith(BEST_IS_MAX_PREFIXES)


class WandbTracker(Tracker):
    """Local `log.jsonl` plus a W&B run; degrades to local-only on the first W&B error."""

    def __init__(self, run_dir: Path, cfg, resume_state: dict | None = None, project: str = "zsbir",
                 entity: str | None = None, group: str | None = None, tags=(), job_type: str | None = "train",
                 mode: str | None = None, run_name: str | None = None, init_timeout_s: float = 90):
        super().__init__(run_dir)
        self.run = None
        self.run_id = (resume_state or {}).get("wandb_run_id")
        self._defined: set[str] = set()
        settings = dict(project=project, entity=entity, group=group, tags=list(tags or []), job_type=job_type,
                        mode=mode, run_name=run_name, init_timeout_s=init_timeout_s)
        self._guarded("init", self._init, settings, cfg)

    # ------------------------------------------------------------------ W&B calls
    def _guarded(self, what: str, fn, *args):
        """Run one W&B call; on any error warn once and continue without W&B."""
        if what != "init" and self.run is None:
            return None
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - a tracking outage must never stop training
            log.warning("W&B %s failed (%s: %s); continuing with the local log only (%s)",
                        what, type(err).__name__, err, self.path)
            self._write({"wandb_error": f"{what}: {type(err).__name__}: {err}"})
            self._abandon_run()
            return None

    def _abandon_run(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already degraded; nothing more to report
                pass

    def _init(self, logger_cfg, cfg) -> None:
        import wandb

        keys = filter_keys(cfg)
        if not self.run_id:  # chosen before init, so even a run whose init failed resumes under one id
            self.run_id = uuid.uuid4().hex[:16]
        name = logger_cfg["run_name"] or f"{keys['method']}-{keys['dataset']}-seed{keys['seed']}"
        self.run = wandb.init(
            project=logger_cfg["project"],
            entity=logger_cfg["entity"],
            group=logger_cfg["group"],
            tags=logger_cfg["tags"],
            job_type=logger_cfg["job_type"],
            mode=logger_cfg["mode"],
            name=name,
            id=self.run_id,
            resume="allow",
            dir=str(self.path.parent),
            config={**keys, "cfg": OmegaConf.to_container(cfg, resolve=True)},
            # Several runs of one sweep share this process: close any run a failed job left open.
            reinit="finish_previous",
            settings=wandb.Settings(init_timeout=float(logger_cfg["init_timeout_s"])),
        )
        self.run.define_metric("step")
        log.info("W&B run %s (%s, project %s)", self.run_id, self.run.settings.mode, logger_cfg["project"])

    def _define(self, keys) -> None:
        for key in keys:
            if key not in self._defined and key != "step":
                self.run.define_metric(key, step_metric="step", summary="max" if summarise_best(key) else None)
                self._defined.add(key)

    def _log(self, values: dict, step: int) -> None:
        self._define(values)
        self.run.log({"step": step, **values})

    def _log_images(self, name: str, paths: list[Path], step: int) -> None:
        import wandb

        self._define([name])
        self.run.log({"step": step, name: [wandb.Image(str(p), caption=Path(p).stem) for p in paths]})

    def _summary(self, values: dict) -> None:
        self.run.summary.update(values)

    # ------------------------------------------------------------------ Tracker API
    def log(self, values: dict, step: int) -> None:
        super().log(values, step)
        self._guarded("log", self._log, {k: scalar(v) for k, v in values.items()}, step)

    def log_images(self, name: str, paths: list[Path], step: int) -> None:
        super().log_images(name, paths, step)
        self._guarded("log_images", self._log_images, name, list(paths), step)

    def summary(self, values: dict) -> None:
        super().summary(values)
        self._guarded("summary", self._summary, {k: scalar(v) for k, v in values.items()})

    def state_dict(self) -> dict:
        return {"wandb_run_id": self.run_id} if self.run_id else {}

    def finish(self, exit_code: int = 0) -> None:
        self._guarded("finish", lambda: self.run.finish(exit_code=exit_code))
        self.run = None
        super().finish(exit_code)
