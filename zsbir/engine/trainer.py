"""The one generic trainer: any encoder, any loss set, any dataset.

It knows nothing about methods. A run: build data, encoder and loss set from the config;
evaluate the untrained network on the unseen test split (the "before training" row);
train with periodic `last.pt` refreshes and seen-class validation (model selection:
`best.pt`); finally evaluate `best.pt` on the unseen test split and write `metrics.json`.
Re-running in the same run directory resumes from `last.pt`.
"""
from __future__ import annotations

from zsbir.errors import ZsbirError

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

from zsbir.data.datamodule import eval_loader, load_split, train_loader
from zsbir.data.gpu_augment import GPUAugment
from zsbir.engine import distributed as dist
from zsbir.engine.checkpoint import CheckpointError, load_checkpoint, save_atomic
from zsbir.engine.optim import build_optimizer, build_scheduler
from zsbir.engine.runinfo import write_run_info
from zsbir.engine.seed import rng_state, seed_everything, set_rng_state
from zsbir.eval.retrieval import evaluate, format_table
from zsbir.losses.base import LossContext, build_loss_set
from zsbir.models.encoder import build_encoder
from zsbir.tracking import build_tracker

log = logging.getLogger("zsbir.train")

CHECKPOINT_FORMAT = 1
DEFAULT_METRICS = ["map_all", "prec_100", "map_200", "prec_200"]


class NonFiniteLossError(ZsbirError):
    """The loss became NaN or Inf; the message names the step and the offending terms."""


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu")
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
            for i, view in enumerate(views):
                start = sum(sizes[:i])
                outputs[view] = type(out)({k: t[start:start + sizes[i]] if torch.is_tensor(t) and t.shape[:1] == images.shape[:1] else t
                                           for k, t in out.items()})
        return outputs


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tcfg = cfg.trainer
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
        self.resume_state: dict = {}
        self._maybe_resume()
        self.train_module = self._wrap_for_training()
        self.tracker = build_tracker(cfg.get("logger"), cfg, self.run_dir, self.resume_state.get("tracker")) if self.main else None
        self.ctx = LossContext(step=self.step, total_steps=self.total_steps, epoch=self.epoch, encoder=self.encoder,
                               steps_per_epoch=self.steps_per_epoch,
                               extras={"class_names": self.data.seen_classes,
                                       "split_dir": self.data.root / str(cfg.data.split_dir),
                                       "synthetic": bool(cfg.data.get("synthetic"))})

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
        option = self.cfg.trainer.get("compile") or False
        compiled = None
        if option:
            backend = "inductor" if option is True else str(option)
            compiled = torch.compile(self.encoder, backend=backend)
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
            "seen_classes": len(self.data.seen_classes),
        }

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self._fingerprint(),
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
            "tracker": self.tracker.state_dict() if self.tracker else {},
        }

    def save(self, name: str) -> None:
        if self.main:
            save_atomic(self.state_dict(), self.run_dir / name)
        self._last_save = time.monotonic()

    def check_fingerprint(self, state: dict, path: Path) -> None:
        theirs, ours = state.get("fingerprint", {}), self._fingerprint()
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} has checkpoint format {state.get('format')}, expected {CHECKPOINT_FORMAT}")
        diffs = [k for k in ours if theirs.get(k) != ours[k]]
        if diffs:
            detail = "; ".join(f"{k}: checkpoint {theirs.get(k)!r} vs config {ours[k]!r}" for k in diffs)
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
        self.encoder.load_state_dict(state["model"])
        self.loss_set.load_state_dict(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for key in ("step", "epoch", "batch_in_epoch", "best_metric", "best_step", "metrics_before", "nonfinite_steps"):
            setattr(self, key, state[key])
        set_rng_state(state["rng"])
        self.resume_state = state
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)

    # ------------------------------------------------------------------ evaluation
    def evaluate_unseen(self) -> dict:
        queries = eval_loader(self.data, self.data.zero_sketch, "sketch", self.cfg.data, self.encoder.norm)
        gallery = eval_loader(self.data, self.data.zero_photo, "photo", self.cfg.data, self.encoder.norm)
        return evaluate(self.encoder, queries, gallery, self.cfg.eval, self.device, self.amp)

    def validate_seen(self) -> dict:
        queries = eval_loader(self.data, self.data.val_sketch, "sketch", self.cfg.data, self.encoder.norm)
        gallery = eval_loader(self.data, self.data.val_photo, "photo", self.cfg.data, self.encoder.norm)
        return evaluate(self.encoder, queries, gallery, self.cfg.eval, self.device, self.amp)

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
        with autocast:
            total, terms = self.forward_step(batch)
        if not dist.all_ranks_true(bool(torch.isfinite(total))):  # every rank skips together, or none does
            bad = [name for name, value in terms.items() if not torch.isfinite(value)]
            if not self.cfg.trainer.skip_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss at step {self.step} (epoch {self.epoch}): terms {bad or ['total']} = "
                    f"{ {k: float(v) for k, v in terms.items()} }. The last good checkpoint is {self.run_dir / 'last.pt'}. "
                    "Lower optim.lr, enable trainer.grad_clip, or set trainer.skip_nonfinite=true to skip such steps"
                )
            self.nonfinite_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("skipping step %d: non-finite loss terms %s (%d skipped so far)", self.step, bad, self.nonfinite_steps)
            return {"skipped": 1.0}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.trainer.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, float(self.cfg.trainer.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {"loss": total.detach(), **{f"loss/{k}": v.detach() for k, v in terms.items()}}

    def encode_views(self, batch: dict) -> dict:
        """Encode every view the losses need (see TrainStep.encode_views)."""
        return TrainStep(self.encoder, self.loss_set, self.views).encode_views(batch)

    def fit(self) -> dict:
        t_start = time.monotonic()
        self._last_save = time.monotonic()
        if self.main:
            write_run_info(self.run_dir)
            OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
        self._log_start()
        self.loss_set.on_train_start(self.ctx, self.data.seen_classes)  # before any work: may reject the config
        if self.metrics_before is None and self.cfg.eval.before_training:
            self.metrics_before = self.evaluate_unseen()
            log.info("unseen-class mAP@all before training: %.4f", self.metrics_before["map_all"])
        tcfg = self.cfg.trainer
        max_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{max_epochs}",
                       disable=not (self.main and tcfg.progress_bar), dynamic_ncols=True, leave=False)
            t_log, images_since = time.monotonic(), 0
            for batch in self.train_loader:
                if self.batch_in_epoch >= self.steps_per_epoch or self.step >= self.total_steps:
                    break
                logs = self.train_step(batch)
                self.step += 1
                self.batch_in_epoch += 1
                images_since += len(batch["label"]) * len(self.views)
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
            bar.close()
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.epoch % int(tcfg.val_every_epochs) == 0 or self.step >= self.total_steps:
                    self._validate()
                self.save("last.pt")
        if self.best_step < 0:  # no validation happened (e.g. max_steps inside the first epoch)
            self._validate()
            self.save("last.pt")
        return self._finish(t_start)

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

    def _finish(self, t_start: float) -> dict:
        dist.barrier()  # rank 0 has finished writing best.pt before any rank reads it
        best = load_checkpoint(self.run_dir / "best.pt", map_location=self.device)
        self.encoder.load_state_dict(best["model"])
        test = self.evaluate_unseen()
        wall_time = time.monotonic() - t_start
        keys = list(dict.fromkeys([*self.cfg.data.metrics, *DEFAULT_METRICS]))
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
        }
        rows = {"untrained network": self.metrics_before} if self.metrics_before else {}
        rows[f"trained (best.pt, step {self.best_step})"] = test
        table = format_table(rows, keys, result["protocol"])
        if self.main:
            with open(self.run_dir / "metrics.json", "w") as handle:
                json.dump(result, handle, indent=2)
            (self.run_dir / "results.txt").write_text(table + "\n")
            log.info("\n%s\nqueries: %d, gallery: %d; wall time %.1f s; run directory %s", table, result["n_queries"],
                     result["n_gallery"], wall_time, self.run_dir)
            self.tracker.summary({f"test/{k}": v for k, v in test.items()})
            self.tracker.finish()
        return result
