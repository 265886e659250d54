"""Faults of reliability round two (docs/reliability.md lists each with its test).

Process-level faults run `python -m zsbir.train` the way a user or SLURM would (own session,
signals to the whole process group); the rest call the functions directly.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from zsbir.config import validate_config
from zsbir.data.filelist import DatasetError, read_filelist
from zsbir.engine.checkpoint import CheckpointError, load_checkpoint, write_text_atomic
from zsbir.engine.nonfinite import SkipBudget, TooManySkippedStepsError
from zsbir.engine.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED
from zsbir.engine.rundir import RunDirectoryError, RunDirectoryInUseError
from zsbir.engine.trainer import NonFiniteLossError
from zsbir.errors import ConfigError
from zsbir.eval.metrics import NonFiniteEmbeddingsError, degenerate_embeddings, retrieval_metrics

from test_resume import wait_for_step  # noqa: E402  (tests/ is on sys.path, as for datatree)

REPO = Path(__file__).resolve().parents[1]
# Smoke-sized CPU run long enough to be interrupted: 3 epochs x 8 steps, last.pt after every step.
LONG_SMOKE = ["debug=smoke", "loss=[triplet]", "trainer.device=cpu", "trainer.max_epochs=3",
              "trainer.limit_train_batches=8", "trainer.ckpt_every_steps=1", "trainer.ckpt_every_s=null",
              "eval.before_training=false"]


def cli_env(cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ZSBIR_CACHE": str(cache),
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- 1. signals with workers
@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, EXIT_PREEMPTED), (signal.SIGINT, EXIT_INTERRUPTED)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_process_group_with_dataloader_workers_saves_and_exits_cleanly(tmp_path, zsbir_cache,
                                                                                    signum, exit_code):
    """scancel / preemption / Ctrl-C signal every process of the job, the 2 DataLoader workers included."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "zsbir.train", *LONG_SMOKE, "data.num_workers=2", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(command, cwd=REPO, env=cli_env(zsbir_cache), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_step(process, run_dir, 2)
        os.killpg(process.pid, signum)  # the whole process group, as SLURM and a terminal do
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == exit_code, output
    stopped = re.search(rf"PreemptedError: stopped by {signal.Signals(signum).name}.* at step (\d+) ", output)
    assert stopped, output
    state = load_checkpoint(run_dir / "last.pt")
    assert state["step"] == int(stopped.group(1)) >= 2  # the stop step itself was saved
    assert "Traceback" not in output and "killed by signal" not in output
    assert not (run_dir / "metrics.json").exists()


# ----------------------------------------------------------------------------- in-process trainers
# 2 epochs x 3 steps; no periodic last.pt; no before-training evaluation.
SMOKE = ["debug=smoke", "loss=[triplet]", "trainer.device=cpu", "trainer.ckpt_every_s=null", "eval.before_training=false"]


@pytest.fixture
def make_trainer(compose_cfg, tmp_path):
    from zsbir.engine.trainer import Trainer

    def make(*overrides: str, run_dir: Path | None = None):
        return Trainer(compose_cfg(*SMOKE, *overrides), run_dir or tmp_path / "run")

    return make


def finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


# ----------------------------------------------------------------------------- 2. NaN embeddings
def test_nonfinite_embeddings_raise_instead_of_scoring_a_perfect_map():
    labels = torch.arange(6) % 3
    with pytest.raises(NonFiniteEmbeddingsError, match=r"6 of 6 query embeddings hold NaN or Inf"):
        retrieval_metrics(torch.full((6, 4), float("nan")), labels, torch.full((6, 4), float("nan")), labels)
    gallery = torch.randn(6, 4)
    gallery[2, 1] = float("inf")
    with pytest.raises(NonFiniteEmbeddingsError, match=r"1 of 6 gallery embeddings"):
        retrieval_metrics(torch.randn(6, 4), labels, gallery, labels)


def test_validation_of_a_diverged_model_names_the_split_instead_of_picking_it_as_best(make_trainer):
    trainer = make_trainer()
    with torch.no_grad():
        for parameter in trainer.encoder.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(NonFiniteEmbeddingsError, match=r"^\d+ of \d+ seen-class validation query \(sketch\) embeddings"):
        trainer.validate()


# ----------------------------------------------------------------------------- 3. skipped steps leave no NaN
def nan_input_at(trainer, steps: set[int]) -> None:
    """A batch of NaN sketches at the given 0-based steps: the forward pass feeds NaN into BatchNorm."""
    real = trainer._prepare_batch

    def prepare(batch):
        batch = real(batch)
        if trainer.step in steps:
            batch["sketch"] = torch.full_like(batch["sketch"], float("nan"))
        return batch

    trainer._prepare_batch = prepare


def test_a_skipped_step_does_not_leave_nan_batchnorm_statistics_in_checkpoints(make_trainer, tmp_path):
    trainer = make_trainer("trainer.skip_nonfinite=true")
    nan_input_at(trainer, {1})
    result = trainer.fit()
    assert result["nonfinite_steps"] == 1 and result["steps"] == 6
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(tmp_path / "run" / name)
        buffers = [v for k, v in state["model"].items() if "running" in k]
        assert buffers and finite(buffers), f"{name} holds non-finite BatchNorm statistics"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["warnings"] == []


def test_too_many_skipped_steps_stop_the_run(make_trainer):
    trainer = make_trainer("trainer.skip_nonfinite=true", "trainer.skip_nonfinite_max_fraction=0.2",
                           "trainer.skip_nonfinite_window=5")
    nan_input_at(trainer, {1, 2, 3, 4, 5})
    with pytest.raises(TooManySkippedStepsError, match=r"2 of the last 3 steps \(up to step 3 \(epoch 1, batch 3\)\)"):
        trainer.fit()


def test_skip_budget_counts_a_sliding_window():
    budget = SkipBudget(max_fraction=0.5, window=4)
    for skipped in (True, False, True, False, False, True, False, True):  # never more than 2 of the last 4
        budget.record(skipped, "here")
    with pytest.raises(TooManySkippedStepsError, match="3 of the last 4 steps"):
        budget.record(True, "here")


# ----------------------------------------------------------------------------- 4. resume with changed keys
def test_resume_applies_a_changed_learning_rate_and_logs_it(make_trainer, caplog):
    first = make_trainer("sched=cosine")
    first.step = 2
    for _ in range(2):  # as after 2 steps
        first.optimizer.step()
        first.scheduler.step()
    first.save("last.pt")
    resumed = make_trainer("sched=cosine", "optim.lr=0.0005")
    assert resumed.step == 2
    assert resumed.scheduler.base_lrs == [0.0005] * len(resumed.optimizer.param_groups)
    factor = resumed.scheduler.lr_lambdas[0](2)
    assert all(g["lr"] == pytest.approx(0.0005 * factor) for g in resumed.optimizer.param_groups)
    assert "resuming with the config's optimiser settings, not the checkpoint's: group 0 lr: 0.001 -> 0.0005" in caplog.text


def test_resume_with_a_changed_seed_or_selection_metric_is_refused(make_trainer):
    make_trainer().save("last.pt")
    with pytest.raises(CheckpointError, match=r"cannot resume .*last.pt with seed: checkpoint 0 -> config 1 "
                                              r"\(the random number streams"):
        make_trainer("seed=1")
    with pytest.raises(CheckpointError, match=r"trainer.select_metric: checkpoint 'map_all' -> config 'prec_100'"):
        make_trainer("trainer.select_metric=prec_100")


# ----------------------------------------------------------------------------- 5. degenerate embeddings
def test_collapsed_embeddings_are_reported_as_degenerate():
    torch.manual_seed(0)
    spread = degenerate_embeddings(torch.randn(40, 16), torch.randn(50, 16))
    assert spread == []
    constant = degenerate_embeddings(torch.ones(40, 16), torch.ones(50, 16))
    assert len(constant) == 2 and "total variance" in constant[0] and "tied" in constant[1]
    # what the tie rule gives them: far above chance although nothing was learnt
    labels_q, labels_g = torch.arange(40) % 5, torch.arange(50) % 5
    assert retrieval_metrics(torch.ones(40, 16), labels_q, torch.ones(50, 16), labels_g)["map_all"] > 0.2


def test_validation_of_a_collapsed_model_warns(make_trainer):
    trainer = make_trainer()
    with torch.no_grad():
        for parameter in trainer.encoder.parameters():
            parameter.zero_()
    trainer.validate()
    assert trainer.warnings and all(w.startswith("seen-class validation at step 0: degenerate embeddings")
                                    for w in trainer.warnings)


# ----------------------------------------------------------------------------- 6. run-directory lock first
HOLD_LOCK = """
import sys, time
from zsbir.engine.rundir import RunDirectoryLock
RunDirectoryLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_launch_into_a_running_directory_writes_nothing_there(tmp_path, zsbir_cache):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    files = {run_dir / ".hydra/config.yaml": "the running job's config\n",
             run_dir / ".hydra/overrides.yaml": "- its overrides\n", run_dir / "train.log": "its log\n"}
    for path, text in files.items():
        path.write_text(text)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], env=cli_env(zsbir_cache),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "zsbir.train", *SMOKE, f"hydra.run.dir={run_dir}"], cwd=REPO,
                              env=cli_env(zsbir_cache), capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f"RunDirectoryBusyError: another process (pid {holder.pid}) is training in {run_dir}" in output
    assert "Traceback" not in output and "data:" not in output
    assert {path: path.read_text() for path in files} == files  # nothing of the running job was overwritten
    print(f"second launch refused after {elapsed:.2f} s (interpreter start included)")


# ----------------------------------------------------------------------------- 7. bombs and bytes
def png_claiming(path: Path, width: int, height: int) -> Path:
    """A small valid PNG whose header (IHDR) claims width x height pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature (8) + length (4) + type (4)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def test_a_decompression_bomb_is_a_dataset_error_naming_file_list_and_line(tmp_path):
    from zsbir.data.filelist import FileList
    from zsbir.data.imagecache import decode_all
    from zsbir.data.pairs import load_image

    png_claiming(tmp_path / "photo/owl/bomb.png", 60000, 60000)
    Image.new("RGB", (4, 4)).save(tmp_path / "photo/owl/fine.png")
    filelist = FileList(["photo/owl/fine.png", "photo/owl/bomb.png"], [0, 0], "lists/photo.txt", [1, 7])
    with pytest.raises(DatasetError, match=re.escape(f"cannot read image {tmp_path / 'photo/owl/bomb.png'} "
                                                     "(listed in lists/photo.txt, line 7)") + ".*decompression bomb"):
        load_image(tmp_path, filelist, 1)
    assert decode_all(tmp_path, filelist.paths, "photo", 8, workers=1) == [1]  # prepare verify=true records it


def test_a_list_with_bytes_that_are_not_utf8_names_the_file_and_line(tmp_path, caplog):
    listing = tmp_path / "sketch_filelist_train.txt"
    listing.write_bytes(b"sketch/cat/1.png 0\nsketch/caf\xe9/2.png 0\nsketch/cat/3.png 0\n")
    with pytest.raises(DatasetError, match=re.escape(f"{listing}, line 2: not UTF-8 text (byte 0xe9 at column 11)")):
        read_filelist(listing)
    kept = read_filelist(listing, strict=False)  # data.strict=false: skipped and counted
    assert kept.paths == ["sketch/cat/1.png", "sketch/cat/3.png"] and kept.line_numbers == [1, 3]
    assert "skipping 1 line(s) of" in caplog.text


# ----------------------------------------------------------------------------- 8. resume=false over results
def test_a_fresh_run_over_an_earlier_runs_results_is_refused_unless_asked(make_trainer, tmp_path):
    make_trainer().save("last.pt")
    with pytest.raises(RunDirectoryInUseError, match=r"trainer.resume=false but .* holds an earlier run's last.pt.*"
                                                    r"hydra.run.dir=<new folder>.*trainer.overwrite=true"):
        make_trainer("trainer.resume=false")
    assert make_trainer("trainer.resume=false", "trainer.overwrite=true").step == 0


# ----------------------------------------------------------------------------- 9. bad values, before any work
@pytest.mark.parametrize("override, message", [
    ("eval.map_at=[0]", "eval.map_at contains 0: a cut-off K must be >= 1"),
    ("eval.prec_at=[-1]", "eval.prec_at contains -1: a cut-off K must be >= 1"),
    ("optim.lr=-1", "optim.lr=-1: must be a finite number > 0"),
    ("optim.lr=1e39", "optim.lr=1e+39: must be a finite number > 0 that fits in float32"),
    ("data.batch_size=1", "data.batch_size=1: must be >= 2"),
    ("model.embed_dim=0", "model.embed_dim=0: must be an integer >= 1"),
])
def test_bad_values_are_config_errors(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(compose_cfg(*SMOKE, override))


def test_a_batch_larger_than_the_dataset_is_a_config_error(make_trainer):
    with pytest.raises(ConfigError, match=r"a batch of 100000 sketches x 1 process\(es\) exceeds the \d+ training "
                                          r"sketches: set data.batch_size"):
        make_trainer("data.batch_size=100000")


def test_a_run_directory_that_is_a_file_is_a_one_line_error(make_trainer, tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(RunDirectoryError, match=r"run directory .*taken/run cannot be created: it, or a folder above "
                                                 r"it, is a file"):
        make_trainer(run_dir=tmp_path / "taken" / "run")


def test_eval_cli_checks_its_options_and_the_run_config_before_any_work(compose_cfg, tmp_path):
    from zsbir.eval import __main__ as eval_cli

    with pytest.raises(ConfigError, match=r"eval.protocol='bogus': must be one of voc\|plain"):
        eval_cli.run_eval(compose_cfg(f"run_dir={tmp_path / 'nowhere'}", "eval.protocol=bogus", config_name="eval"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(eval_cli.RunDirError, match=re.escape(f"cannot read {tmp_path / 'run' / 'config.yaml'}: ")):
        eval_cli.run_eval(compose_cfg(f"run_dir={tmp_path / 'run'}", config_name="eval"))


# ----------------------------------------------------------------------------- 10. result files and messages
def test_result_files_are_written_atomically(tmp_path, monkeypatch):
    from zsbir.engine import checkpoint

    path = tmp_path / "metrics.json"
    write_text_atomic(path, '{"old": 1}')

    def refuse(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "replace", refuse)
    with pytest.raises(CheckpointError, match="could not write result file .*metrics.json.*disk is full"):
        write_text_atomic(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_report_names_the_skipped_files_when_none_remain(tmp_path):
    from zsbir import report

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{not json")
    with pytest.raises(report.ReportError, match=r"no finished runs .* \(skipped: skipped .*run/metrics.json: not a zsbir"):
        report.make_report([tmp_path])


def test_nonfinite_loss_before_any_checkpoint_reads_correctly(make_trainer):
    trainer = make_trainer()
    nan_input_at(trainer, {0})
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.fit()
    assert "at step 1 (epoch 1, batch 1); loss terms {triplet: nan}. No last.pt was written before it. Lower" \
        in str(raised.value)
