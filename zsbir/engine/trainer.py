"""The one generic trainer: any encoder, any loss set, any dataset.

It knows nothing about methods. A run: build data, encoder and loss set from the config;
evaluate the untrained network on the unseen test split (the "before training" row);
train with periodic `last.pt` refreshes and seen-class validation (model selection:
`best.pt`); finally evaluate `best.pt` on the unseen test split and write `metrics.json`.
Re-running in the same run directory resumes from `last.pt`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from zsbir.config import validate_config
from zsbir.data.datamodule import eval_loader, load_split, train_loader
from zsbir.data.gpu_augment import GPUAugment
from zsbir.data.pairs import item_seed
from zsbir.engine import distributed as dist
from zsbir.engine.checkpoint import (CheckpointError, load_checkpoint, remove_stale_temporaries, save_atomic,
                                     write_text_atomic)
from zsbir.engine.nonfinite import SkipBudget, restore_buffers, snapshot_buffers
from zsbir.engine.resume import apply_optimizer_settings, optimizer_settings, refuse_unchangeable_keys
from zsbir.engine.rundir import RunDirectoryLock, claim_run_directory, refuse_fresh_run_over_results
from zsbir.engine.preemption import PreemptionHandler
from zsbir.engine.optim import build_optimizer, build_scheduler
from zsbir.engine.runinfo import write_run_info
from zsbir.engine.seed import rng_state, seed_everything, set_rng_state
from zsbir.errors import ConfigError, ZsbirError
from zsbir.eval.retrieval import embedding_warnings, evaluate_with_embeddings, format_table, table_keys
from zsbir.eval.visualize import write_retrieval_grids
from zsbir.losses.base import LossContext, build_loss_set
from zsbir.models.encoder import build_encoder
from zsbir.tracking import build_tracker

log = logging.getLogger("zsbir.train")

CHECKPOINT_FORMAT = 1
LOADER_SEED_STREAM = 998  # item_seed stream of the train loader's generator (the sampler uses 999)
DEFAULT_METRICS = ["map_all", "prec_100", "map_200", "prec_200"]


class NonFiniteLossError(ZsbirError):
    """The loss became NaN or Inf; the message names the step and the offending terms."""


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={requested} but no CUDA device is available; use trainer.device=auto or cpu")
    return device


def amp_dtype(precision: str, device: torch.device):
    if precision == "fp32" or device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class SpeedOptionError(ZsbirError):
    """A trainer speed option that cannot work in this run (hardware, model or launch)."""


class TrainStep(nn.Module):
    """The encoder and the loss set as one module whose forward is a whole step's loss.

    One forward per step is what DistributedDataParallel needs to synchronise the
    gradients of both (loss terms may own parameters) even though the encoder runs once
    per domain. `compiled_encoder` (torch.compile of the same encoder) is kept outside the
    module tree, so parameters and checkpoints see only the plain encoder.
    """

    def __init__(self, encoder: nn.Module, loss_set: nn.Module, views: tuple[str, ...], compiled_encoder=None):
        super().__init__()
        self.encoder, self.loss_set, self.views = encoder, loss_set, views
        self._compiled = (compiled_encoder,)

    def forward(self, batch: dict, ctx: LossContext):
        return self.loss_set(batch, self.encode_views(batch), ctx)

    def encode_views(self, batch: dict) -> dict:
        """Encode every view the losses need; views of one domain share one forward pass."""
        encoder = self.encoder if self._compiled[0] is None else self._compiled[0]
        by_domain: dict[str, list[str]] = {}
        for view in self.views:
            by_domain.setdefault("sketch" if view.startswith("sketch") else "photo", []).append(view)
        outputs = {}
        for domain, views in by_domain.items():
            images = torch.cat([batch[v] for v in views])
            out = encoder(images, domain)
            sizes = [len(batch[v]) for v in views]
            # Per-item outputs are split back by view; anything else (e.g. a scalar) is shared.
            pieces = {k: t.split(sizes) if torch.is_tensor(t) and t.shape[:1] == images.shape[:1] else [t] * len(views)
                      for k, t in out.items()}
            for i, view in enumerate(views):
                outputs[view] = type(out)({k: parts[i] for k, parts in pieces.items()})
        return outputs


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg = cfg
        validate_config(cfg)  # before any work: a typo must not cost a dataset load or an epoch
        self.run_dir = Path(run_dir)
        tcfg = cfg.trainer
        if dist.is_main():  # before any work: a busy, unwritable or already used directory
            claim_run_directory(self.run_dir).release()
            refuse_fresh_run_over_results(self.run_dir, bool(tcfg.resume), bool(tcfg.get("overwrite")))
        seed_everything(int(cfg.seed), bool(cfg.deterministic))
        self.device = dist.local_device(pick_device(str(tcfg.device)))
        self.amp = amp_dtype(str(tcfg.precision), self.device)
        self.main = dist.is_main()

        self.data = load_split(cfg.data, seed=int(cfg.seed))
        self.encoder = build_encoder(cfg.model, len(self.data.seen_classes)).to(self.device)
        self._apply_model_options()
        self.loss_set = build_loss_set(cfg.loss).to(self.device)
        self.views = self.loss_set.views
        self.gpu_augment = (GPUAugment(str(cfg.data.augment), self.encoder.norm, int(cfg.seed))
                            if cfg.data.get("gpu_augment") else None)
        self.train_loader = train_loader(self.data, cfg.data, self.encoder.norm, self.views, int(cfg.seed),
                                         rank=dist.rank(), world_size=dist.world_size())
        self.sampler = self.train_loader.batch_sampler
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if tcfg.get("limit_train_batches"):
            self.steps_per_epoch = min(self.steps_per_epoch, int(tcfg.limit_train_batches))
        self.total_steps = int(tcfg.max_steps) if tcfg.get("max_steps") else int(tcfg.max_epochs) * self.steps_per_epoch
        lr = float(cfg.optim.lr)
        groups = self.encoder.param_groups(lr) + self.loss_set.param_groups(lr)
        self.optimizer = build_optimizer(cfg.optim, groups,
                                         fused=bool(tcfg.get("fused_optimizer")) and self.device.type == "cuda")
        self.scheduler = build_scheduler(cfg.sched, self.optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp is torch.float16)

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_metric = -math.inf
        self.best_step = -1
        self.metrics_before: dict | None = None
        self.nonfinite_steps = 0
        self.warnings: list[str] = []  # degenerate embeddings seen in this session's evaluations (metrics.json)
        self.skip_budget = SkipBudget(tcfg.get("skip_nonfinite_max_fraction", 0.2), tcfg.get("skip_nonfinite_window", 50))
        self._buffers: list = []  # buffers before this step's forward (trainer.skip_nonfinite)
        self.resume_state: dict = {}
        self.wall_time_before = 0.0  # seconds spent in earlier sessions of this run (resumes)
        self._t_fit = time.monotonic()
        self.saved_step = -1  # the step of the newest last.pt (-1: none yet)
        self._loaders: dict[str, tuple] = {}
        self.ctx = LossContext(step=self.step, total_steps=self.total_steps, epoch=self.epoch, encoder=self.encoder,
                               steps_per_epoch=self.steps_per_epoch,
                               extras={"class_names": self.data.seen_classes,
                                       "split_dir": self.data.root / str(cfg.data.split_dir),
                                       "synthetic": bool(cfg.data.get("synthetic"))})
        # Before resuming (and before any work: a term may reject the config), so that a resumed
        # run starts the terms exactly as the first run did (same weights, same RNG draws), and
        # their saved state then overrides what this built.
        self.loss_set.on_train_start(self.ctx, self.data.seen_classes)
        self._maybe_resume()
        self.train_module = self._wrap_for_training()
        self.tracker = build_tracker(cfg.get("logger"), cfg, self.run_dir, self.resume_state.get("tracker")) if self.main else None
        self.preemption = PreemptionHandler()

    # ------------------------------------------------------------------ speed options
    def _apply_model_options(self) -> None:
        """SyncBatchNorm, channels_last and gradient checkpointing on the plain encoder."""
        tcfg = self.cfg.trainer
        if tcfg.get("sync_bn") and dist.world_size() > 1:
            if self.device.type != "cuda":
                raise SpeedOptionError("trainer.sync_bn=true needs GPUs (NCCL); torch's SyncBatchNorm does not run "
                                       "on CPU. Set trainer.sync_bn=false for CPU runs")
            self.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder)
        if tcfg.get("channels_last"):
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        if tcfg.get("grad_checkpointing"):
            self.encoder.set_grad_checkpointing(True)

    def _wrap_for_training(self) -> nn.Module:
        """The module a training step calls: encoder + losses, optionally compiled, DDP-wrapped under a process group."""
        tcfg = self.cfg.trainer
        compiled = torch.compile(self.encoder, backend=str(tcfg.compile_backend)) if tcfg.get("compile") else None
        module = TrainStep(self.encoder, self.loss_set, self.views, compiled)
        if dist.world_size() == 1:
            return module
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=bool(self.cfg.trainer.get("ddp_find_unused_parameters")))

    def _prepare_batch(self, batch: dict) -> dict:
        """Move to the device; GPU-side augmentation and channels_last when configured."""
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        for stream, view in enumerate(self.views):
            if self.gpu_augment is not None:
                domain = "sketch" if view.startswith("sketch") else "photo"
                batch[view] = self.gpu_augment(batch[view], domain, self.epoch, batch["index"], stream)
            if self.cfg.trainer.get("channels_last"):
                batch[view] = batch[view].contiguous(memory_format=torch.channels_last)
        return batch

    def forward_step(self, batch: dict):
        try:
            return self.train_module(batch, self.ctx)
        except RuntimeError as err:
            if "find_unused_parameters" not in str(err):
                raise
            raise SpeedOptionError(
                "some trainable parameters got no gradient in the previous step (a head no loss term uses, or a "
                "term that skips steps), which DistributedDataParallel cannot reduce with "
                "trainer.ddp_find_unused_parameters=false; set it to true, or freeze the unused parameters"
            ) from err

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> dict:
        """What a checkpoint must match to be loaded into this run."""
        return {
            "model": OmegaConf.to_container(self.cfg.model, resolve=True),
            "loss_terms": sorted(self.loss_set.terms),
            "dataset": self.data.name,
            "seen_classes": len(self.data.seen_classes),
        }

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self._fingerprint(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "model": self.encoder.state_dict(),
            "losses": self.loss_set.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "metrics_before": self.metrics_before,
            "nonfinite_steps": self.nonfinite_steps,
            "rng": rng_state(),
            "wall_time_s": self.wall_time(),
            "tracker": self.tracker.state_dict() if self.tracker else {},
        }

    def save(self, name: str) -> None:
        if self.main:
            save_atomic(self.state_dict(), self.run_dir / name)
        if name == "last.pt":
            self._last_save, self.saved_step = time.monotonic(), self.step

    def check_fingerprint(self, state: dict, path: Path) -> None:
        theirs, ours = state.get("fingerprint", {}), self._fingerprint()
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} has checkpoint format {state.get('format')}, expected {CHECKPOINT_FORMAT}")
        diffs = _changed_keys({k: theirs.get(k) for k in ours}, ours, before="checkpoint ", after="config ")
        if diffs:
            detail = "; ".join(diffs)
            raise CheckpointError(
                f"{path} was written by a different model or config ({detail}). Use the same config to "
                "resume, or start a new run directory (hydra.run.dir=...)"
            )

    def _maybe_resume(self) -> None:
        path = self.run_dir / "last.pt"
        if not (self.cfg.trainer.resume and path.is_file()):
            return
        state = load_checkpoint(path)
        self.check_fingerprint(state, path)
        refuse_unchangeable_keys(state.get("config") or {}, OmegaConf.to_container(self.cfg, resolve=True), path)
        fresh = optimizer_settings(self.optimizer, self.scheduler)
        self.encoder.load_state_dict(state["model"])
        self.loss_set.load_state_dict(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        applied = apply_optimizer_settings(self.optimizer, self.scheduler, fresh)
        if applied:
            log.warning("resuming with the config's optimiser settings, not the checkpoint's: %s", "; ".join(applied))
        self.scaler.load_state_dict(state["scaler"])
        for key in ("step", "epoch", "batch_in_epoch", "best_metric", "best_step", "metrics_before", "nonfinite_steps"):
            setattr(self, key, state[key])
        set_rng_state(state["rng"])
        self.wall_time_before = float(state.get("wall_time_s", 0.0))
        self.resume_state, self.saved_step = state, self.step
        self.ctx.step, self.ctx.epoch = self.step, self.epoch
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch + 1, self.batch_in_epoch)
        changed = _changed_keys(state.get("config") or {}, OmegaConf.to_container(self.cfg, resolve=True))
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))

    # ------------------------------------------------------------------ evaluation
    def evaluate_unseen(self, with_embeddings: bool = False):
        """Unseen-class metrics; with `with_embeddings`, (metrics, Embeddings)."""
        queries, gallery = self._eval_loaders("zero")
        metrics, embeddings = evaluate_with_embeddings(self.encoder, queries, gallery, self.cfg.eval, self.device, self.amp,
                                                       split="unseen-class test")
        return (metrics, embeddings) if with_embeddings else metrics

    def write_grids(self, embeddings) -> list[Path]:
        """Retrieval grids of the unseen-class test queries into <run_dir>/grids (eval.grids)."""
        grids = self.cfg.eval.get("grids") or {}
        return write_retrieval_grids(embeddings, self.data.root, self.data.zero_sketch, self.data.zero_photo,
                                     self.data.unseen_classes, self.run_dir / "grids", **grids)

    def validate_seen(self) -> dict:
        queries, gallery = self._eval_loaders("val")
        split = "seen-class validation"
        metrics, embeddings = evaluate_with_embeddings(self.encoder, queries, gallery, self.cfg.eval, self.device,
                                                       self.amp, split=split)
        self.warnings += embedding_warnings(embeddings, f"{split} at step {self.step}")
        return metrics

    def _eval_loaders(self, split: str):
        """(query, gallery) loaders of the `zero` (unseen test) or `val` (seen) split, built once per run,
        so images kept in memory (data.cache_images) are decoded once, not at every evaluation."""
        if split not in self._loaders:
            lists = (getattr(self.data, f"{split}_sketch"), getattr(self.data, f"{split}_photo"))
            self._loaders[split] = tuple(eval_loader(self.data, filelist, domain, self.cfg.data, self.encoder.norm)
                                         for filelist, domain in zip(lists, ("sketch", "photo")))
        return self._loaders[split]

    # ------------------------------------------------------------------ training
    def _log_start(self) -> None:
        total, trainable = self.encoder.num_parameters()
        loss_params = sum(p.numel() for p in self.loss_set.parameters() if p.requires_grad)
        log.info("run directory: %s", self.run_dir)
        log.info("device: %s%s%s", self.device, f" (autocast {self.amp})" if self.amp else "",
                 f"; {dist.world_size()} processes, per-process batch {self.cfg.data.batch_size}"
                 if dist.world_size() > 1 else "")
        log.info("data: %s %s", self.data.name, self.data.counts())
        log.info("model: %s, parameters: %d total, %d trainable (+%d in loss heads)",
                 self.cfg.model.get("name", "?"), total, trainable, loss_params)
        log.info("losses: %s; views: %s", {k: self.loss_set.weights[k] for k in self.loss_set.terms}, self.views)
        log.info("schedule: %d steps (%d per epoch)", self.total_steps, self.steps_per_epoch)

    def train_step(self, batch: dict) -> dict:
        batch = self._prepare_batch(batch)
        self.ctx.step, self.ctx.epoch = self.step, self.epoch
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()
        # A skipped step must not keep the running statistics its forward pass computed.
        self._buffers = snapshot_buffers(self.encoder, self.loss_set) if self.cfg.trainer.skip_nonfinite else []
        with autocast:
            total, terms = self.forward_step(batch)
        if not dist.all_ranks_true(bool(torch.isfinite(total))):  # every rank skips together, or none does
            bad = [name for name, value in terms.items() if not torch.isfinite(value)]
            where = "total (weighted sum)" if not torch.isfinite(total) else "on another rank"
            return self._nonfinite(f"non-finite loss (terms {bad or [where]})", terms)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = None
        if self.cfg.trainer.grad_clip:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float(self.cfg.trainer.grad_clip))
        elif not self.scaler.is_enabled():
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # fp16's GradScaler skips steps with inf gradients itself; elsewhere one would poison the weights
        # (and every later last.pt) although the loss was finite.
        if grad_norm is not None and not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
            return self._nonfinite(f"non-finite gradient norm {float(grad_norm)} from a finite loss", terms)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.cfg.trainer.skip_nonfinite:
            self.skip_budget.record(False, "")
        return {"loss": total.detach(), **{f"loss/{k}": v.detach() for k, v in terms.items()}}

    def _nonfinite(self, problem: str, terms: dict) -> dict:
        """Stop with NonFiniteLossError, or (trainer.skip_nonfinite) drop this step's update and count it."""
        self.optimizer.zero_grad(set_to_none=True)
        where = f"step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch_in_epoch + 1})"
        if not self.cfg.trainer.skip_nonfinite:
            last = (f"The last good checkpoint {self.run_dir / 'last.pt'} (step {self.saved_step}) is kept unchanged"
                    if self.saved_step >= 0 else "No last.pt was written before it")
            raise NonFiniteLossError(
                f"{problem} at {where}; loss terms {_term_values(terms)}. {last}. "
                "Lower optim.lr, enable trainer.grad_clip, or set trainer.skip_nonfinite=true to skip such steps"
            )
        restore_buffers(self._buffers)
        self.nonfinite_steps += 1
        log.warning("skipping %s: %s; loss terms %s (%d skipped so far)", where, problem, _term_values(terms),
                    self.nonfinite_steps)
        self.skip_budget.record(True, where)
        return {"skipped": 1.0}

    def encode_views(self, batch: dict) -> dict:
        """Encode every view the losses need (see TrainStep.encode_views)."""
        return TrainStep(self.encoder, self.loss_set, self.views).encode_views(batch)

    def fit(self) -> dict:
        lock = RunDirectoryLock(self.run_dir) if self.main else None
        if lock:
            lock.acquire()
            remove_stale_temporaries(self.run_dir)
        try:
            with self.preemption:
                return self._fit()
        finally:
            if lock:
                lock.release()

    def wall_time(self) -> float:
        """Seconds of this run so far, summed over every session (a resumed run continues the count)."""
        return self.wall_time_before + time.monotonic() - self._t_fit

    def _fit(self) -> dict:
        self._t_fit = time.monotonic()
        self._last_save = time.monotonic()
        if self.main:
            write_run_info(self.run_dir)
            write_text_atomic(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        self._log_start()
        if self.metrics_before is None and self.cfg.eval.before_training:
            self.metrics_before = self.evaluate_unseen()
            log.info("unseen-class mAP@all before training: %.4f", self.metrics_before["map_all"])
            self._stop_if_requested()
        tcfg = self.cfg.trainer
        max_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            # Each epoch's loader seed depends on the epoch only, as in a run that was never resumed.
            self.train_loader.generator.manual_seed(item_seed(int(self.cfg.seed), self.epoch, 0, LOADER_SEED_STREAM))
            bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{max_epochs}",
                       disable=not (self.main and tcfg.progress_bar), dynamic_ncols=True, leave=False)
            t_log, images_since = time.monotonic(), 0
            for batch in self.train_loader if self._epoch_unfinished() else ():
                logs = self.train_step(batch)
                self.step += 1
                self.batch_in_epoch += 1
                images_since += len(batch["label"]) * len(self.views) * dist.world_size()  # the whole job's
                bar.update(1)
                if self.step % int(tcfg.log_every) == 0 or self.step == self.total_steps:
                    elapsed = max(1e-9, time.monotonic() - t_log)
                    values = {k: float(v) for k, v in logs.items()}
                    values["lr"] = self.optimizer.param_groups[0]["lr"]
                    values["images_per_s"] = images_since / elapsed
                    bar.set_postfix({k.removeprefix("loss/"): f"{v:.3g}" for k, v in values.items()})
                    if self.main and bar.disable:  # no progress bar: the console still gets every term
                        log.info("step %d/%d: %s", self.step, self.total_steps,
                                 ", ".join(f"{k.removeprefix('loss/')} {v:.4g}" for k, v in values.items()))
                    if self.tracker:
                        self.tracker.log({**values, "epoch": self.epoch}, self.step)
                    t_log, images_since = time.monotonic(), 0
                if self._checkpoint_due():
                    self.save("last.pt")
                self._stop_if_requested()
                if not self._epoch_unfinished():
                    break  # before the loader reads a batch this epoch will not use
            bar.close()
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.epoch % int(tcfg.val_every_epochs) == 0 or self.step >= self.total_steps:
                    self._validate()
                self.save("last.pt")
                self._stop_if_requested()
        if self.best_step < 0:  # no validation happened (e.g. max_steps inside the first epoch)
            self._validate()
            self.save("last.pt")
        return self._finish()

    def _epoch_unfinished(self) -> bool:
        return self.batch_in_epoch < self.steps_per_epoch and self.step < self.total_steps

    def _stop_if_requested(self) -> None:
        """After a preemption signal (on any rank): save last.pt and stop (PreemptedError)."""
        stop = self.preemption.requested()
        if dist.is_initialized():  # every rank must stop at the same step
            flag = torch.tensor([float(stop)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if not stop:
            return
        if self.saved_step != self.step:
            self.save("last.pt")
        self.preemption.stop(f"at step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch}); "
                             f"saved {self.run_dir / 'last.pt'}")

    def _checkpoint_due(self) -> bool:
        tcfg = self.cfg.trainer
        if tcfg.get("ckpt_every_steps") and self.step % int(tcfg.ckpt_every_steps) == 0:
            return True
        return bool(tcfg.get("ckpt_every_s")) and time.monotonic() - self._last_save >= float(tcfg.ckpt_every_s)

    def _validate(self) -> None:
        metrics = self.validate_seen()
        key = str(self.cfg.trainer.select_metric)
        value = metrics[key]
        improved = value > self.best_metric
        if improved:
            self.best_metric, self.best_step = value, self.step
        log.info("step %d: seen-class validation %s = %.4f%s", self.step, key, value, " (best)" if improved else "")
        if self.tracker:
            self.tracker.log({f"val/{k}": v for k, v in metrics.items()}, self.step)
        if improved:
            self.save("best.pt")

    def _finish(self) -> dict:
        dist.barrier()  # rank 0 has finished writing best.pt before any rank reads it
        best = load_checkpoint(self.run_dir / "best.pt", map_location=self.device)
        self.encoder.load_state_dict(best["model"])
        test, embeddings = self.evaluate_unseen(with_embeddings=True)
        self.warnings += embedding_warnings(embeddings, f"unseen-class test (best.pt, step {self.best_step})")
        grids = self.write_grids(embeddings) if self.main else []
        wall_time = self.wall_time()
        keys = table_keys(self.cfg.data.metrics, self.cfg.eval, DEFAULT_METRICS)
        total, trainable = self.encoder.num_parameters()
        result = {
            "method": self.cfg.get("method"),
            "dataset": self.data.name,
            "model": self.cfg.model.get("name"),
            "seed": int(self.cfg.seed),
            "protocol": str(self.cfg.eval.protocol),
            "per_class": bool(self.cfg.eval.per_class),
            "metrics_order": keys,
            "test": test,
            "test_before_training": self.metrics_before,
            "n_queries": test["n_queries"],
            "n_gallery": test["n_gallery"],
            "best_val": {"metric": str(self.cfg.trainer.select_metric), "value": self.best_metric, "step": self.best_step},
            "steps": self.step,
            "epochs": self.epoch,
            "nonfinite_steps": self.nonfinite_steps,
            "params_total": total,
            "params_trainable": trainable,
            "world_size": dist.world_size(),
            "wall_time_s": round(wall_time, 2),
            "retrieval_grids": [str(p.relative_to(self.run_dir)) for p in grids],
            "warnings": self.warnings,
        }
        rows = {"untrained network": self.metrics_before} if self.metrics_before else {}
        rows[f"trained (best.pt, step {self.best_step})"] = test
        table = format_table(rows, keys, result["protocol"])
        if self.main:
            write_text_atomic(self.run_dir / "metrics.json", json.dumps(result, indent=2))
            write_text_atomic(self.run_dir / "results.txt", table + "\n")
            log.info("\n%s\nqueries: %d, gallery: %d; wall time %.1f s; run directory %s", table, result["n_queries"],
                     result["n_gallery"], wall_time, self.run_dir)
            self.tracker.summary({f"test/{k}": v for k, v in test.items()})
            if grids:
                self.tracker.log_images("retrieval_grids", grids, self.step)
            self.tracker.finish()
        return result


def _term_values(terms: dict) -> str:
    return "{" + ", ".join(f"{name}: {float(value.detach()):.4g}" for name, value in terms.items()) + "}"


def _changed_keys(old: dict, new: dict, prefix: str = "", before: str = "", after: str = "") -> list[str]:
    """`key: <before>old -> <after>new` for every dotted key whose value differs between two plain dicts."""
    changed = []
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, path + ".", before, after)
        elif a != b:
            changed.append(f"{path}: {before}{a!r} -> {after}{b!r}")
    return changed
