"""Faults a run must survive or report clearly (docs/reliability.md lists each with its test).

Trainings here run in-process on smoke-sized CPU configs; the entry-point tests run
`python -m zsbir.train` to check what a user sees: one line naming the problem, no traceback.
"""
from __future__ import annotations

import ast
import errno
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from zsbir.data.filelist import DatasetError
from zsbir.engine import checkpoint
from zsbir.engine.checkpoint import CheckpointError, load_checkpoint, save_atomic
from zsbir.engine.rundir import RunDirectoryBusyError
from zsbir.engine.preemption import EXIT_PREEMPTED, PreemptedError
from zsbir.engine.seed import rng_state, set_rng_state
from zsbir.engine.trainer import NonFiniteLossError, Trainer
from zsbir.errors import ConfigError, MissingWeightsError, ZsbirError
from zsbir.losses.base import LossTerm

REPO = Path(__file__).resolve().parents[1]
# 2 epochs x 3 steps; last.pt only when a test asks for it; no before-training evaluation.
SMOKE = ["debug=smoke", "loss=[triplet]", "trainer.device=cpu", "trainer.ckpt_every_s=null", "eval.before_training=false"]


@pytest.fixture
def make_trainer(compose_cfg, tmp_path):
    def make(*overrides: str, run_dir: Path | None = None) -> Trainer:
        return Trainer(compose_cfg(*SMOKE, *overrides), run_dir or tmp_path / "run")

    return make


def run_cli(tmp_path: Path, *overrides: str, env: dict | None = None) -> tuple[int, str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    command = [sys.executable, "-m", "zsbir.train", *SMOKE, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


# ----------------------------------------------------------------------------- atomic checkpoints
def half_write_then_fail(error: BaseException):
    """A torch.save that writes half of the real bytes, then fails like a full disk or a kill."""
    real_save = torch.save

    def save(obj, handle, *args, **kwargs):
        from io import BytesIO

        buffer = BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise error

    return save


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupted"])
def test_failed_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1, "weight": torch.ones(1000)}, path)
    monkeypatch.setattr(torch, "save", half_write_then_fail(error))
    expected = CheckpointError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as raised:
        save_atomic({"step": 2, "weight": torch.zeros(1000)}, path)
    if expected is CheckpointError:
        assert "disk is full" in str(raised.value) and "last.pt, if any, is unchanged" in str(raised.value)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_failed_rename_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_atomic({"step": 1}, path)

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(checkpoint.os, "replace", refuse)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*best.pt.*Permission denied"):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_checkpoint_write_failing_during_training_keeps_last_and_best(make_trainer, tmp_path, monkeypatch):
    """The write of last.pt at step 4 fails: the run stops, last.pt (step 3) and best.pt still load."""
    trainer = make_trainer("trainer.ckpt_every_steps=1")
    real_save, calls = torch.save, []

    def save(obj, handle, *args, **kwargs):
        calls.append(obj["step"])
        if len(calls) == 6:  # after last.pt at steps 1, 2, 3, best.pt at 3, last.pt at the epoch end (3): step 4
            return half_write_then_fail(OSError(errno.ENOSPC, "No space left on device"))(obj, handle)
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError, match="disk is full"):
        trainer.fit()
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert load_checkpoint(run_dir / "last.pt")["step"] == 3
    assert load_checkpoint(run_dir / "best.pt")["step"] == 3
    assert not list(run_dir.glob(".*.tmp"))


def test_last_pt_is_refreshed_during_epochs_by_steps_or_seconds(make_trainer, tmp_path, compose_cfg):
    assert compose_cfg().trainer.ckpt_every_s <= 60  # by default at least once per minute of training
    for overrides, expected in [
        (["trainer.ckpt_every_steps=2"], [2, 3, 4, 6, 6]),  # every 2 steps, and at each epoch end
        (["trainer.ckpt_every_s=1e-9"], [1, 2, 3, 3, 4, 5, 6, 6]),  # "every 0 seconds": after every step
        ([], [3, 6]),  # neither: at epoch ends only
    ]:
        trainer = make_trainer(*overrides, run_dir=tmp_path / "-".join(overrides or ["none"]))
        saved, real_save = [], trainer.save
        trainer.save = lambda name: (saved.append(trainer.step) if name == "last.pt" else None, real_save(name))
        trainer.fit()
        assert saved == expected, overrides


# ----------------------------------------------------------------------------- NaN / Inf
class NonFiniteAt(LossTerm):
    """Wraps a term; at the given (0-based) steps its value is `poison`, or its gradient is."""

    def __init__(self, inner: LossTerm, steps: set[int], poison: str = "nan"):
        super().__init__()
        self.inner, self.steps, self.poison = inner, steps, poison
        self.views = inner.views

    def forward(self, batch, outputs, ctx):
        value = self.inner(batch, outputs, ctx)
        if ctx.step not in self.steps:
            return value
        if self.poison == "gradient":  # finite value, NaN gradient: d sqrt(|x|)/dx at x = 0
            return value + (value * 0).abs().sqrt()
        return value * float(self.poison)


def poison(trainer: Trainer, term: str, steps: set[int], kind: str = "nan") -> None:
    trainer.loss_set.terms[term] = NonFiniteAt(trainer.loss_set.terms[term], steps, kind)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_loss_stops_naming_step_and_term_and_keeps_last_good_checkpoint(make_trainer, tmp_path, kind):
    trainer = make_trainer("loss=[triplet,ce]", "model.cls_head=true", "trainer.ckpt_every_steps=1")
    poison(trainer, "ce", {3}, kind)  # the 4th step: epoch 2, batch 1
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.fit()
    message = str(raised.value)
    assert "non-finite loss (terms ['ce']) at step 4 (epoch 2, batch 1)" in message
    assert f"ce: {kind}" in message and "last.pt (step 3) is kept unchanged" in message
    assert "trainer.skip_nonfinite=true" in message
    kept = load_checkpoint(tmp_path / "run" / "last.pt")
    assert kept["step"] == 3
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("grad_clip", ["null", "5.0"])
def test_nonfinite_gradient_from_finite_loss_stops_before_the_update(make_trainer, tmp_path, grad_clip):
    trainer = make_trainer(f"trainer.grad_clip={grad_clip}", "trainer.ckpt_every_steps=1")
    poison(trainer, "triplet", {1}, "gradient")
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm nan from a finite loss at step 2"):
        trainer.fit()
    weights = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert all(torch.isfinite(p).all() for p in trainer.encoder.parameters())  # the bad update was not applied


def test_skip_nonfinite_skips_and_counts_the_steps(make_trainer, tmp_path, caplog):
    trainer = make_trainer("trainer.skip_nonfinite=true")
    poison(trainer, "triplet", {1, 4})
    result = trainer.fit()
    assert result["nonfinite_steps"] == 2 and result["steps"] == 6
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["nonfinite_steps"] == 2
    assert "skipping step 2 (epoch 1, batch 2): non-finite loss (terms ['triplet']); loss terms {triplet: nan}" in caplog.text
    assert all(torch.isfinite(p).all() for p in trainer.encoder.parameters())


# ----------------------------------------------------------------------------- preemption
def signal_after_step(trainer: Trainer, step: int, signum: int) -> None:
    """Deliver `signum` to this process right after the given (1-based) step, as SLURM would."""
    real_step = trainer.train_step

    def train_step(batch):
        logs = real_step(batch)
        if trainer.step + 1 == step:
            os.kill(os.getpid(), signum)
        return logs

    trainer.train_step = train_step


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_saves_last_pt_and_stops_cleanly(make_trainer, tmp_path, signum):
    before = signal.getsignal(signum)
    trainer = make_trainer()  # no periodic last.pt: the one found was written because of the signal
    signal_after_step(trainer, 2, signum)
    with pytest.raises(PreemptedError) as raised:
        trainer.fit()
    # Ctrl-C: the shell's 130, not "requeue me"
    assert raised.value.exit_code == (130 if signum == signal.SIGINT else EXIT_PREEMPTED) and EXIT_PREEMPTED == 75
    assert f"stopped by {signal.Signals(signum).name} at step 2 (epoch 1, batch 2)" in str(raised.value)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (2, 0, 2)
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert signal.getsignal(signum) is before  # the handler is uninstalled
    resumed = make_trainer()
    assert resumed.step == 2 and resumed.fit()["steps"] == 6


def test_a_launchers_own_signal_handler_runs_after_last_pt_is_saved(make_trainer, tmp_path):
    """submitit installs a SIGUSR1 handler that requeues the job: it must still run, after the save."""
    seen = []

    def launcher_handler(signum, frame):
        seen.append(load_checkpoint(tmp_path / "run" / "last.pt")["step"])

    previous = signal.signal(signal.SIGUSR1, launcher_handler)
    try:
        trainer = make_trainer()
        signal_after_step(trainer, 1, signal.SIGUSR1)
        with pytest.raises(PreemptedError):
            trainer.fit()
        assert seen == [1]
        assert signal.getsignal(signal.SIGUSR1) is launcher_handler
    finally:
        signal.signal(signal.SIGUSR1, previous)


# ----------------------------------------------------------------------------- checkpoints that do not fit
def test_checkpoint_of_a_different_model_is_refused(make_trainer, tmp_path):
    make_trainer().save("last.pt")
    with pytest.raises(CheckpointError) as raised:
        make_trainer("model.embed_dim=64")
    message = str(raised.value)
    assert "last.pt was written by a different model or config (model.embed_dim: checkpoint 128 -> config 64)" in message
    assert "start a new run directory (hydra.run.dir=...)" in message


def test_checkpoint_with_other_loss_terms_is_refused(make_trainer):
    make_trainer().save("last.pt")
    with pytest.raises(CheckpointError, match=r"loss_terms: checkpoint \['triplet'\] -> config \['ce', 'triplet'\]"):
        make_trainer("loss=[triplet,ce]", "model.cls_head=true")


def test_truncated_checkpoint_is_reported_not_loaded(make_trainer, tmp_path):
    make_trainer().save("last.pt")
    path = tmp_path / "run" / "last.pt"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"(?s)last.pt.*may be truncated.*delete it \(or move it away\) to start the run over"):
        make_trainer()


class Payload:
    """A pickle that runs code when unpickled (creates a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(make_trainer, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    run_dir.mkdir()
    with open(run_dir / "last.pt", "wb") as handle:
        torch.save({"format": 1, "payload": Payload(marker)}, handle)
    with pytest.raises(CheckpointError, match="(?i)weights_only|unsupported global"):
        make_trainer()
    assert not marker.exists()


def test_no_code_in_the_project_unpickles_untrusted_files():
    """torch.load only with weights_only=True; no pickle.load(s); no np.load(allow_pickle=True)."""
    offences = []
    for path in sorted((REPO / "zsbir").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if (name.endswith("torch.load") and keywords.get("weights_only") != "True"
                    or name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load")
                    or name.endswith(("np.load", "numpy.load")) and keywords.get("allow_pickle") not in (None, "False")):
                offences.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not offences, offences


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    import random

    import numpy as np

    save_atomic({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


HOLD_LOCK = """
import sys, time
from zsbir.engine.rundir import RunDirectoryLock
RunDirectoryLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_process_in_the_same_run_directory_is_refused(make_trainer, tmp_path):
    trainer = make_trainer()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")], env=env, stdout=subprocess.PIPE,
                             text=True)  # another job training there
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryBusyError, match=f"another process \\(pid {other.pid}\\) is training in"):
            trainer.fit()
    finally:
        other.kill()
        other.wait()
    assert trainer.fit()["steps"] == 6  # once it is gone


# ----------------------------------------------------------------------------- bad data
def write_tiny_dataset(root: Path) -> Path:
    """A hand-made benchmark in the real layout: 3 seen classes, 1 unseen, 4 images per list and class."""
    split = root / "zeroshot"
    split.mkdir(parents=True)
    seen, unseen = ["cat", "dog", "cow"], ["owl"]
    (split / "cname_cid.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(seen)))
    (split / "cname_cid_zero.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(unseen)))
    lists = {"sketch_filelist_train.txt": ("sketch", seen, 0), "sketch_filelist_test.txt": ("sketch", seen, 4),
             "photo_filelist_train.txt": ("photo", seen, 0), "sketch_filelist_zero.txt": ("sketch", unseen, 0),
             "photo_filelist_zero.txt": ("photo", unseen, 0)}
    for name, (domain, classes, first) in lists.items():
        lines = []
        for label, cname in enumerate(classes):
            for i in range(first, first + 4):
                rel = f"{domain}/{cname}/{i}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (40 * label, 80, 255 - 60 * i)).save(root / rel)
                lines.append(f"{rel} {label}\n")
        (split / name).write_text("".join(lines))
    return root


TINY_DATA = ["data.synthetic=null", "data.name=tiny", "data.batch_size=4", "data.val_gallery_size=8"]


def test_corrupt_image_names_path_list_and_line(make_trainer, tmp_path):
    root = write_tiny_dataset(tmp_path / "tiny")
    (root / "sketch/dog/1.png").write_bytes(b"this is not a PNG")  # line 6 of the training sketch list
    trainer = make_trainer(*TINY_DATA, f"data.root={root}", "data.num_workers=1")
    children_before = set(multiprocessing.active_children())
    with pytest.raises(DatasetError) as raised:
        trainer.fit()
    # The loader's worker ended with the error although pytest keeps the traceback (and the loop's
    # frame) alive: a leaked worker held the run lock and pytest's stdout until the end of CI.
    assert set(multiprocessing.active_children()) <= children_before
    message = str(raised.value)  # read in a DataLoader worker, reported without the worker's traceback
    assert message.startswith(f"cannot read image {root / 'sketch/dog/1.png'} "
                              f"(listed in {root / 'zeroshot/sketch_filelist_train.txt'}, line 6)")
    assert "Traceback" not in message and "verify=true" in message


def test_missing_dataset_folder_or_list_file_fails_before_any_work(make_trainer, tmp_path):
    with pytest.raises(DatasetError, match=re.escape(f"dataset split folder not found: {tmp_path / 'nowhere/zeroshot'}")):
        make_trainer(*TINY_DATA, f"data.root={tmp_path / 'nowhere'}")
    root = write_tiny_dataset(tmp_path / "tiny")
    (root / "zeroshot/photo_filelist_zero.txt").unlink()
    with pytest.raises(DatasetError, match="file list not found: .*photo_filelist_zero.txt. Check data.root"):
        make_trainer(*TINY_DATA, f"data.root={root}")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_missing_pretrained_file_is_a_missing_weights_error(make_trainer, tmp_path):
    with pytest.raises(MissingWeightsError, match=re.escape(f"model.pretrained={tmp_path}/nope.pth: no such file")):
        make_trainer("model.tiny=false", f"model.pretrained={tmp_path}/nope.pth")


# ----------------------------------------------------------------------------- what the user sees
def test_user_errors_are_zsbir_errors():
    from zsbir.engine.checkpoint import CheckpointError as checkpoint_error

    for error in (checkpoint_error, DatasetError, MissingWeightsError, NonFiniteLossError, ConfigError,
                  PreemptedError, RunDirectoryBusyError):
        assert issubclass(error, ZsbirError), error


def test_entry_point_unknown_key_on_the_command_line(tmp_path):
    rc, output = run_cli(tmp_path, "trainer.max_epoch=3")
    assert rc == 1
    assert "Could not override 'trainer.max_epoch'" in output and "Key 'max_epoch' is not in struct" in output
    assert "Traceback" not in output


def test_entry_point_config_errors_fail_before_any_work_in_one_line(tmp_path):
    rc, output = run_cli(tmp_path, "+trainer.max_epoch=3", "trainer.precision=bf17", "data.batch_size=eight")
    assert rc == 1, output
    assert ("ConfigError: 3 problems in the config: unknown key trainer.max_epoch (did you mean trainer.max_epochs?); "
            "trainer.precision='bf17': must be one of bf16|fp16|fp32; data.batch_size='eight': expected an integer."
            ) in output
    assert "Traceback" not in output and "run directory:" not in output  # nothing was built
    assert not (tmp_path / "run" / "last.pt").exists()


def test_entry_point_missing_pretrained_weights(tmp_path, zsbir_cache):
    rc, output = run_cli(tmp_path, "model=resnet50", "model.tiny=false", "model.pretrained=resnet50.tv_in1k",
                         env={"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf"),
                              "ZSBIR_CACHE": str(zsbir_cache)})
    assert rc == 1, output
    assert "MissingWeightsError: pretrained weights 'resnet50.tv_in1k' (timm) are not available" in output
    assert "model.pretrained=/path/to/file" in output and "Traceback" not in output
