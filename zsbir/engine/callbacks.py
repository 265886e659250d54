"""Periodic work around the training loop, one small class per concern.

`Trainer.fit()` calls every callback, in list order, after each step (`on_step_end`),
after each finished epoch (`on_epoch_end`) and once after the loop (`on_train_end`).
Adding periodic work (a new logger, an extra evaluation) means adding a callback to
`default_callbacks`, not editing the loop. The order matters: validation runs before
the `last.pt` refresh (which records the best metric), and the preemption check runs
last (it saves what is not yet saved, then stops).
"""
from __future__ import annotations

import logging
import time

import torch

from zsbir.engine import distributed as dist

log = logging.getLogger("zsbir.train")


class Callback:
    def on_fit_start(self, trainer) -> None:
        pass

    def on_epoch_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, logs: dict) -> None:
        pass

    def on_epoch_end(self, trainer) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass


class StepLogger(Callback):
    """Every `trainer.log_every` steps: losses, lr and images/s to the progress bar, console and tracker."""

    def __init__(self, every: int):
        self.every = int(every)
        self._t, self._images = time.monotonic(), 0

    def on_epoch_start(self, trainer) -> None:
        self._t, self._images = time.monotonic(), trainer.images_seen

    def on_step_end(self, trainer, logs: dict) -> None:
        if trainer.step % self.every and trainer.step != trainer.total_steps:
            return
        values = {k: float(v) for k, v in logs.items()}
        values["lr"] = trainer.optimizer.param_groups[0]["lr"]
        values["images_per_s"] = (trainer.images_seen - self._images) / max(1e-9, time.monotonic() - self._t)
        trainer.bar.set_postfix({k.removeprefix("loss/"): f"{v:.3g}" for k, v in values.items()})
        if trainer.is_main_process and trainer.bar.disable:  # no progress bar: the console still gets every term
            log.info("step %d/%d: %s", trainer.step, trainer.total_steps,
                     ", ".join(f"{k.removeprefix('loss/')} {v:.4g}" for k, v in values.items()))
        if trainer.tracker:
            trainer.tracker.log({**values, "epoch": trainer.epoch}, trainer.step)
        self._t, self._images = time.monotonic(), trainer.images_seen


class UntrainedEvaluation(Callback):
    """The "before training" row of the results: the untrained network on the test split (eval.before_training)."""

    def on_fit_start(self, trainer) -> None:
        if trainer.metrics_before is None:
            trainer.metrics_before = trainer.evaluator.evaluate(trainer.encoder)
            log.info("unseen-class mAP@all before training: %.4f", trainer.metrics_before["map_all"])


class SeenClassValidation(Callback):
    """Seen-class validation every `val_every_epochs` epochs and after the last step (model selection:
    best.pt); once after the loop if none happened (max_steps inside the first epoch)."""

    def __init__(self, every_epochs: int):
        self.every_epochs = int(every_epochs)

    def on_epoch_end(self, trainer) -> None:
        if trainer.epoch % self.every_epochs == 0 or trainer.step >= trainer.total_steps:
            trainer.validate()

    def on_train_end(self, trainer) -> None:
        if trainer.best_step < 0:
            trainer.validate()


class LastCheckpoint(Callback):
    """Refresh last.pt every `ckpt_every_steps` steps / `ckpt_every_s` seconds, at each epoch end, and after
    the loop when the training state changed since the last save."""

    def __init__(self, every_steps: int | None, every_s: float | None):
        self.every_steps, self.every_s = every_steps, every_s

    def _due(self, trainer) -> bool:
        if self.every_steps and trainer.step % int(self.every_steps) == 0:
            return True
        return bool(self.every_s) and time.monotonic() - trainer.last_save_time >= float(self.every_s)

    def on_step_end(self, trainer, logs: dict) -> None:
        if self._due(trainer):
            trainer.save("last.pt")

    def on_epoch_end(self, trainer) -> None:
        trainer.save("last.pt")

    def on_train_end(self, trainer) -> None:
        if trainer.unsaved_changes:
            trainer.save("last.pt")


class PreemptionStop(Callback):
    """After a preemption signal on any rank: save last.pt and stop (PreemptedError), every rank at the same step."""

    def check(self, trainer) -> None:
        stop = trainer.preemption.requested()
        if dist.is_initialized():
            flag = torch.tensor([float(stop)], device=trainer.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if not stop:
            return
        if trainer.saved_step != trainer.step:
            trainer.save("last.pt")
        trainer.preemption.stop(f"at step {trainer.step} (epoch {trainer.epoch + 1}, batch {trainer.batch_in_epoch}); "
                                f"saved {trainer.run_dir / 'last.pt'}")

    def on_fit_start(self, trainer) -> None:
        self.check(trainer)

    def on_step_end(self, trainer, logs: dict) -> None:
        self.check(trainer)

    def on_epoch_end(self, trainer) -> None:
        self.check(trainer)


def default_callbacks(cfg) -> list[Callback]:
    tcfg = cfg.trainer
    before = [UntrainedEvaluation()] if cfg.eval.before_training else []
    return [*before, StepLogger(int(tcfg.log_every)), SeenClassValidation(int(tcfg.val_every_epochs)),
            LastCheckpoint(tcfg.get("ckpt_every_steps"), tcfg.get("ckpt_every_s")), PreemptionStop()]
