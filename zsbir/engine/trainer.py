"""The one generic trainer: any encoder, any loss set, any dataset.

It knows nothing about methods. A run: build data, encoder and loss set from the config;
evaluate the untrained network on the unseen test split (the "before training" row);
train with periodic `last.pt` refreshes and seen-class validation (model selection:
`best.pt`); finally evaluate `best.pt` on the unseen test split and write `metrics.json`.
Re-running in the same run directory resumes from `last.pt`.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from zsbir.choices import ENCODE_MODES
from zsbir.config import validate_config
from zsbir.data.datamodule import load_split, train_loader
from zsbir.data.gpu_augment import GPUAugment
from zsbir.data.iteration import batches
from zsbir.data.pairs import LOADER_STREAM, item_seed
from zsbir.data.views import domain_of
from zsbir.engine import distributed as dist
from zsbir.engine.callbacks import default_callbacks
from zsbir.engine.checkpoint import (changed_keys, check_fingerprint, checkpoint_state, fingerprint, load_checkpoint,
                                     remove_stale_temporaries, save_atomic, write_text_atomic)
from zsbir.engine.device import amp_dtype, pick_device
from zsbir.engine.nonfinite import SkipBudget, restore_buffers, snapshot_buffers
from zsbir.engine.resume import apply_optimizer_settings, optimizer_settings, refuse_unchangeable_keys
from zsbir.engine.rundir import RunDirectoryLock, claim_run_directory, refuse_fresh_run_over_results
from zsbir.engine.preemption import PreemptionHandler
from zsbir.engine.optim import build_optimizer, build_scheduler
from zsbir.engine.runinfo import write_run_info
from zsbir.engine.seed import rng_state, seed_everything, set_rng_state
from zsbir.errors import ConfigError, ZsbirError
from zsbir.eval.evaluator import Evaluator
from zsbir.eval.protocols import selected_protocols
from zsbir.eval.rerank import RESULT_KEY, check_pair_model, evaluate_rerank, rerank_settings, rerank_table
from zsbir.eval.retrieval import embedding_warnings
from zsbir.losses.base import LossContext, build_loss_set
from zsbir.models.encoder import DOMAIN_IDS, build_encoder
from zsbir.tracking import build_tracker

log = logging.getLogger("zsbir.train")

# Training progress saved in every checkpoint and restored on resume (besides weights, optimizer and RNG).
RESUMED_FIELDS = ("step", "epoch", "batch_in_epoch", "best_metric", "best_step", "metrics_before", "nonfinite_steps")


class NonFiniteLossError(ZsbirError):
    """The loss became NaN or Inf; the message names the step and the offending terms."""


class SpeedOptionError(ZsbirError):
    """A trainer speed option that cannot work in this run (hardware, model or launch)."""


class TrainStep(nn.Module):
    """The encoder, the auxiliary passes and the loss set as one module whose forward is a whole step's loss.

    One forward per step is what DistributedDataParallel needs to synchronise the
    gradients of both (loss terms may own parameters). The auxiliary passes (frozen teacher, VxL sampler, masked encoder pass:
    zsbir/models/auxiliary.py) run here, under the same autocast as the encoder; the loss
    set then computes in float32. `compiled_encoder` (torch.compile of the same encoder) is
    kept outside the module tree, so parameters and checkpoints see only the plain encoder.
    """

    def __init__(self, encoder: nn.Module, loss_set: nn.Module, views: tuple[str, ...], compiled_encoder=None,
                 encode: str = "joint"):
        super().__init__()
        if encode not in ENCODE_MODES:
            raise ConfigError(f"model.encode={encode!r}: must be one of {'|'.join(ENCODE_MODES)}")
        self.encoder, self.loss_set, self.views, self.encode = encoder, loss_set, views, encode
        self._compiled = (compiled_encoder,)
        self.auxiliary_passes = loss_set.auxiliary_passes

    def forward(self, batch: dict, ctx: LossContext):
        return self.loss_set(batch, self.step_outputs(batch), ctx)

    def step_outputs(self, batch: dict) -> dict:
        """Per-view encoder outputs, with what the auxiliary passes add."""
        outputs = self.encode_views(batch)
        for aux in self.auxiliary_passes:
            aux(batch, outputs, self.encoder)
        return outputs

    def encode_views(self, batch: dict) -> dict:
        """Encode every view the losses need.

        `joint`: all views in ONE encoder call, each sample tagged with its domain (SAKE and
        DSN's official training: BatchNorm normalises sketches and photos with the same batch
        statistics, as its running statistics mix them at evaluation). `per_domain`: one call
        per domain (the views of a domain share it), for two-tower models and recipes that
        rely on per-domain batch statistics.
        """
        encoder = self.encoder if self._compiled[0] is None else self._compiled[0]
        groups: dict[str, list[str]] = {}
        for view in self.views:
            groups.setdefault("all" if self.encode == "joint" else domain_of(view), []).append(view)
        outputs = {}
        for key, views in groups.items():
            images = torch.cat([batch[v] for v in views])
            sizes = [len(batch[v]) for v in views]
            if key == "all":
                domain = torch.cat([torch.full((n,), DOMAIN_IDS[domain_of(v)], dtype=torch.long, device=images.device)
                                    for v, n in zip(views, sizes)])
            else:
                domain = key
            out = encoder(images, domain)
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
        # Evaluation embeddings: fp32 unless eval.precision opts in to autocast (bf16 rounding,
        # ~4e-3, reorders near-ties among tens of thousands of gallery photos).
        self.eval_amp = amp_dtype(str(cfg.eval.get("precision") or "fp32"), self.device)
        self.is_main_process = dist.is_main()

        self.data = load_split(cfg.data, seed=int(cfg.seed))
        self.encoder = build_encoder(cfg.model, len(self.data.seen_classes)).to(self.device)
        self.encode_mode = str(cfg.model.get("encode") or "joint")
        self.rerank = rerank_settings(cfg.eval)  # relation-network test mode (eval.rerank), checked before training
        if self.rerank:
            check_pair_model(self.encoder)
        # trainer.max_steps=0: evaluate the network as built (a frozen pretrained encoder, or an
        # untrained one) and write metrics.json; no loss, optimiser, loader or checkpoint is made.
        self.evaluation_only = tcfg.get("max_steps") is not None and int(tcfg.max_steps) == 0
        if self.evaluation_only:
            self._init_evaluation_only()
            return
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
        self.total_steps = (int(tcfg.max_steps) if tcfg.get("max_steps") is not None
                            else int(tcfg.max_epochs) * self.steps_per_epoch)
        lr = float(cfg.optim.lr)
        groups = self.encoder.param_groups(lr) + self.loss_set.param_groups(lr)
        if not groups:
            raise ConfigError(f"model {cfg.model.get('name', '?')} has no trainable parameters and the losses have "
                              "none either, so there is nothing to train: set trainer.max_steps=0 to evaluate it "
                              "without training (experiment=frozen does)")
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
        self.last_save_time = time.monotonic()
        self.unsaved_changes = False  # training state changed since the newest last.pt
        self.images_seen = 0  # images encoded by training steps in this session (all views, all processes)
        self.evaluator = Evaluator(self.data, cfg.data, cfg.eval, self.encoder.norm, self.device, self.eval_amp)
        self.callbacks = default_callbacks(cfg)
        self.ctx = LossContext(step=self.step, total_steps=self.total_steps, epoch=self.epoch, encoder=self.encoder,
                               steps_per_epoch=self.steps_per_epoch,
                               class_names=self.data.seen_classes, split_dir=self.data.split_dir)
        # Before resuming (and before any work: a term may reject the config), so that a resumed
        # run starts the terms exactly as the first run did (same weights, same RNG draws), and
        # their saved state then overrides what this built.
        self.loss_set.on_train_start(self.ctx, self.data.seen_classes)
        self._maybe_resume()
        self.train_module = self._wrap_for_training()
        self.tracker = (build_tracker(cfg.get("logger"), cfg, self.run_dir, self.resume_state.get("tracker"))
                        if self.is_main_process else None)
        self.preemption = PreemptionHandler()

    def _init_evaluation_only(self) -> None:
        """The state an evaluation-only run (trainer.max_steps=0) needs: no loss set, loader or optimiser."""
        found = [name for name in ("last.pt", "best.pt") if (self.run_dir / name).is_file()]
        if found:  # never leave another run's checkpoints beside this run's metrics.json
            raise ConfigError(f"trainer.max_steps=0 evaluates the network as built, but {self.run_dir} holds a "
                              f"training checkpoint ({', '.join(found)}): evaluate it with `python -m zsbir.eval "
                              f"run_dir={self.run_dir}`, or use a new run directory (hydra.run.dir=...)")
        self.step = self.epoch = self.batch_in_epoch = self.total_steps = self.steps_per_epoch = 0
        self.best_metric, self.best_step = None, -1
        self.metrics_before, self.nonfinite_steps, self.warnings = None, 0, []
        self.wall_time_before, self._t_fit = 0.0, time.monotonic()
        self.evaluator = Evaluator(self.data, self.cfg.data, self.cfg.eval, self.encoder.norm, self.device,
                                   self.eval_amp)
        self.resume_state = {}
        self.tracker = build_tracker(self.cfg.get("logger"), self.cfg, self.run_dir, {}) if self.is_main_process else None
        self.preemption = PreemptionHandler()

    # ------------------------------------------------------------------ speed options
    def _apply_model_options(self) -> None:
        """SyncBatchNorm, channels_last and gradient checkpointing on the plain encoder."""
        tcfg = self.cfg.trainer
        if tcfg.get("sync_bn") and dist.is_initialized():  # also a 1-process group (bench gpu checks the path)
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
        compiled = None
        if tcfg.get("compile"):
            compiled = torch.compile(self.encoder, backend=str(tcfg.compile_backend))
            for aux in self.loss_set.auxiliary_passes:
                aux.compile(str(tcfg.compile_backend))
        module = TrainStep(self.encoder, self.loss_set, self.views, compiled, self.encode_mode)
        if not dist.is_initialized():  # a launcher with one process starts no group (distributed.launch_env)
            return module
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=bool(self.cfg.trainer.get("ddp_find_unused_parameters")))

    def _prepare_batch(self, batch: dict) -> dict:
        """Move to the device; GPU-side augmentation and channels_last when configured."""
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        for stream, view in enumerate(self.views):
            if self.gpu_augment is not None:
                batch[view] = self.gpu_augment(batch[view], domain_of(view), self.epoch, batch["index"], stream)
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

    # ------------------------------------------------------------------ checkpoints (format: engine/checkpoint.py)
    def fingerprint(self) -> dict:
        return fingerprint(self.cfg, self.loss_set.terms, self.data.name, len(self.data.seen_classes))

    def state_dict(self) -> dict:
        return checkpoint_state(
            self.fingerprint(), self.cfg, self.encoder.state_dict(),
            losses=self.loss_set.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
            **{key: getattr(self, key) for key in RESUMED_FIELDS},
            rng=rng_state(), wall_time_s=self.wall_time(), tracker=self.tracker.state_dict() if self.tracker else {},
        )

    def save(self, name: str) -> None:
        if self.is_main_process:
            save_atomic(self.state_dict(), self.run_dir / name)
        if name == "last.pt":
            self.last_save_time, self.saved_step, self.unsaved_changes = time.monotonic(), self.step, False

    def _maybe_resume(self) -> None:
        path = self.run_dir / "last.pt"
        if not (self.cfg.trainer.resume and path.is_file()):
            return
        state = load_checkpoint(path)
        check_fingerprint(state, self.fingerprint(), path,
                          "Use the same config to resume, or start a new run directory (hydra.run.dir=...)")
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
        for key in RESUMED_FIELDS:
            setattr(self, key, state[key])
        set_rng_state(state["rng"])
        self.wall_time_before = float(state.get("wall_time_s", 0.0))
        self.resume_state, self.saved_step = state, self.step
        self.ctx.step, self.ctx.epoch = self.step, self.epoch
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch + 1, self.batch_in_epoch)
        changed = changed_keys(state.get("config") or {}, OmegaConf.to_container(self.cfg, resolve=True))
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))

    # ------------------------------------------------------------------ evaluation (zsbir/eval/evaluator.py)
    def validate(self) -> None:
        """Seen-class validation; a better `trainer.select_metric` writes best.pt."""
        metrics, embeddings = self.evaluator.evaluate_with_embeddings(self.encoder, split="val")
        self.warnings += embedding_warnings(embeddings, f"seen-class validation at step {self.step}")
        key = str(self.cfg.trainer.select_metric)
        value = metrics[key]
        improved = value > self.best_metric
        if improved:
            self.best_metric, self.best_step = value, self.step
            self.unsaved_changes = True
        log.info("step %d: seen-class validation %s = %.4f%s", self.step, key, value, " (best)" if improved else "")
        if self.tracker:
            self.tracker.log({f"val/{k}": v for k, v in metrics.items()}, self.step)
        if improved:
            self.save("best.pt")

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

    def step_outputs(self, batch: dict) -> dict:
        """What the loss terms of a step read: encoder outputs per view plus auxiliary passes (TrainStep)."""
        return TrainStep(self.encoder, self.loss_set, self.views, encode=self.encode_mode).step_outputs(batch)

    def fit(self) -> dict:
        lock = RunDirectoryLock(self.run_dir) if self.is_main_process else None
        if lock:
            lock.acquire()
            remove_stale_temporaries(self.run_dir)
        try:
            with self.preemption:
                return self._evaluate_only() if self.evaluation_only else self._fit()
        finally:
            if lock:
                lock.release()

    def wall_time(self) -> float:
        """Seconds of this run so far, summed over every session (a resumed run continues the count)."""
        return self.wall_time_before + time.monotonic() - self._t_fit

    def _fit(self) -> dict:
        """The training loop; periodic work (logging, validation, last.pt, preemption) is in self.callbacks."""
        self._t_fit = self.last_save_time = time.monotonic()
        if self.is_main_process:
            write_run_info(self.run_dir)
            write_text_atomic(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        self._log_start()
        self._call("on_fit_start")
        max_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            # Each epoch's loader seed depends on the epoch only, as in a run that was never resumed.
            self.train_loader.generator.manual_seed(item_seed(int(self.cfg.seed), self.epoch, 0, LOADER_STREAM))
            self.bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch,
                            desc=f"epoch {self.epoch + 1}/{max_epochs}", dynamic_ncols=True, leave=False,
                            disable=not (self.is_main_process and self.cfg.trainer.progress_bar))
            self._call("on_epoch_start")
            with batches(self.train_loader if self._epoch_unfinished() else ()) as epoch_batches:
                for batch in epoch_batches:
                    logs = self.train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    self.images_seen += sum(len(batch[v]) for v in self.views) * dist.world_size()  # whole job's
                    self.unsaved_changes = True
                    self.bar.update(1)
                    self._call("on_step_end", logs)
                    if not self._epoch_unfinished():
                        break  # before the loader reads a batch this epoch will not use
            self.bar.close()
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                self._call("on_epoch_end")
        self._call("on_train_end")
        return self._finish()

    def _evaluate_only(self) -> dict:
        """trainer.max_steps=0: one evaluation of the network as built; it is both the "before" and the final row.

        Writes run_info.json, config.yaml and metrics.json (results.txt, grids); no last.pt / best.pt,
        since there is no training state to resume or select.
        """
        self._t_fit = time.monotonic()
        if self.is_main_process:
            write_run_info(self.run_dir)
            write_text_atomic(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        total, trainable = self.encoder.num_parameters()
        log.info("run directory: %s", self.run_dir)
        log.info("data: %s %s", self.data.name, self.data.counts())
        log.info("model: %s, parameters: %d total, %d trainable; trainer.max_steps=0: evaluation only, no training",
                 self.cfg.model.get("name", "?"), total, trainable)
        return self._finish()

    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _epoch_unfinished(self) -> bool:
        return self.batch_in_epoch < self.steps_per_epoch and self.step < self.total_steps

    def _finish(self) -> dict:
        """Test best.pt on the test split; write metrics.json, results.txt and the retrieval grids."""
        if not self.evaluation_only:
            dist.barrier()  # rank 0 has finished writing best.pt before any rank reads it
            best = load_checkpoint(self.run_dir / "best.pt", map_location=self.device)
            self.encoder.load_state_dict(best["model"])
        protocols = selected_protocols(self.cfg.eval, require_zs=True)
        results = self.evaluator.evaluate_protocols(self.encoder, protocols)
        test, embeddings = results["zs"]
        evaluated = ("network as built (trainer.max_steps=0, no training)" if self.evaluation_only
                     else f"trained (best.pt, step {self.best_step})")
        self.warnings += embedding_warnings(embeddings, f"unseen-class test ({evaluated})")
        if self.evaluation_only:  # no step ran: the untrained network is the one just evaluated
            self.metrics_before = dict(test)
        drawn = self.evaluator.grids_protocol(protocols)
        grids = (self.evaluator.for_protocol(drawn).write_grids(results[drawn][1], self.run_dir / "grids")
                 if self.is_main_process and drawn else [])
        wall_time = self.wall_time()
        total, trainable = self.encoder.num_parameters()
        described = self.evaluator.describe()
        result = {
            "method": self.cfg.get("method"),
            "dataset": self.data.name,
            "model": self.cfg.model.get("name"),
            "seed": int(self.cfg.seed),
            **described,
            **self.evaluator.results_by_key(results),
            "protocols": protocols,
            "test_eval_seconds": self.evaluator.seconds,
            "test_before_training": self.metrics_before,
            "n_queries": test["n_queries"],
            "n_gallery": test["n_gallery"],
            "best_val": {"metric": str(self.cfg.trainer.select_metric), "value": self.best_metric, "step": self.best_step},
            "evaluation_only": self.evaluation_only,
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
        # an evaluation-only run has one row: its "before" is the evaluation itself
        untrained = ({"untrained network": self.metrics_before} if self.metrics_before and not self.evaluation_only
                     else {})
        table = self.evaluator.tables(results, evaluated, untrained)
        if self.rerank:  # relation-network mode, beside the retrieval-mode metrics
            result[RESULT_KEY] = evaluate_rerank(self.evaluator, self.encoder, embeddings, self.rerank)
            table += "\n\n" + rerank_table(self.evaluator, evaluated, result[RESULT_KEY])
        if self.is_main_process:
            self.evaluator.write_results(self.run_dir, "metrics.json", result, table)
            log.info("\n%s\nqueries: %d, gallery: %d; wall time %.1f s; run directory %s", table, result["n_queries"],
                     result["n_gallery"], wall_time, self.run_dir)
            self.tracker.summary({f"test/{k}": v for k, v in test.items()})
            if grids:
                self.tracker.log_images("retrieval_grids", grids, self.step)
            self.tracker.finish()
        return result


def _term_values(terms: dict) -> str:
    return "{" + ", ".join(f"{name}: {float(value.detach()):.4g}" for name, value in terms.items()) + "}"
