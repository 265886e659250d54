"""Distributed data parallel on CPU (gloo): launcher environments, rank sharding, and a real
2-process torchrun training whose metrics equal a single-process evaluation of its best.pt."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zsbir.data.pairs import EpochBatchSampler
from zsbir.engine.distributed import DistributedSetupError, launch_env, slurm_first_host
from zsbir.eval.retrieval import restore_order, shard

REPO = Path(__file__).resolve().parents[1]
# Smoke-sized, with 3 items per class so that the unseen lists (45 items) do not split
# evenly over 2 ranks: the gather must drop the padding.
DIST_OVERRIDES = ["debug=smoke", "data.max_per_class=3", "trainer.max_epochs=2", "trainer.limit_train_batches=2"]


def test_launch_env_reads_torchrun_variables():
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29400"}
    launch = launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (1, 4, 1, "torchrun")
    assert (launch.master_addr, launch.master_port) == ("10.0.0.2", 29400)


def test_launch_env_reads_slurm_variables_and_torchrun_wins_inside_slurm():
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "gpu[07-08,11]"}
    launch = launch_env(slurm)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (5, 8, 1, "slurm")
    assert launch.master_addr == "gpu07"
    assert launch.master_port == 20000 + 123456 % 20000
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launch_env({**slurm, **torchrun}).launcher == "torchrun"
    # Inside an srun step the step's task count is the world (the allocation may hold more tasks).
    assert launch_env({**slurm, "SLURM_STEP_NUM_TASKS": "4"}).world_size == 4


def test_single_process_launches_have_no_process_group():
    assert launch_env({}) is None
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None
    assert launch_env({"RANK": "0", "WORLD_SIZE": "1"}) is None


def test_broken_launch_environment_is_named():
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR"):
        launch_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedSetupError, match="SLURM_NTASKS='two'"):
        launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "two"})


def test_slurm_first_host_without_scontrol():
    assert slurm_first_host("node[01-04,07],gpu5") == "node01"
    assert slurm_first_host("login3") == "login3"


@pytest.mark.parametrize("balanced", [False, True])
def test_rank_samplers_give_disjoint_batches_and_equal_counts(balanced):
    labels = np.repeat(np.arange(10), 13)  # 130 items: 16 batches of 8, 5 per rank on 3 ranks
    kwargs = {"classes_per_batch": 4, "items_per_class": 2} if balanced else {}
    for epoch in (0, 1):
        per_rank = []
        for rank in range(3):
            sampler = EpochBatchSampler(labels, 8, seed=3, rank=rank, world_size=3, **kwargs)
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) == sampler.batches_per_epoch() == 5
            per_rank.append([tuple(i for _, i in b) for b in batches])
        everything = [b for batches in per_rank for b in batches]
        assert len(set(everything)) == len(everything)  # no batch on two ranks
        if not balanced:  # plain batches are disjoint slices of one permutation
            items = [i for b in everything for i in b]
            assert len(set(items)) == len(items)
        if epoch == 0:
            first_epoch = per_rank
    assert per_rank != first_epoch  # reshuffled every epoch


def test_eval_shards_cover_the_list_once_and_order_is_restored():
    dataset = torch.utils.data.TensorDataset(torch.arange(45.0).view(-1, 1), torch.arange(45) % 5, torch.arange(45))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    shards = [shard(loader, rank, 2) for rank in range(2)]
    assert [len(s.dataset) for s in shards] == [23, 22]
    rows = [row for s in reversed(shards) for row in s.dataset]  # out of order, as a gather could be
    embeddings = torch.stack([r[0] for r in rows])
    labels, indices = torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])
    ordered, ordered_labels = restore_order(embeddings, labels, indices)
    assert torch.equal(ordered[:, 0], torch.arange(45.0)) and torch.equal(ordered_labels, torch.arange(45) % 5)
    with pytest.raises(RuntimeError, match="exactly once|twice"):
        restore_order(embeddings[1:], labels[1:], torch.cat([indices[:1], indices[2:]]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, zsbir_cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m zsbir.train ...` on CPU; fails the test with its output if it fails."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ZSBIR_CACHE": str(zsbir_cache),
           "TMPDIR": str(scratch)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "zsbir.train", *overrides]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert not list(scratch.glob("zsbir-rank*"))  # rank 1's Hydra scratch folder is removed
    return proc


def test_two_process_training_matches_single_process_evaluation(tmp_path, zsbir_cache, compose_cfg):
    from zsbir.engine.checkpoint import load_checkpoint
    from zsbir.engine.trainer import Trainer

    outputs = tmp_path / "outputs"
    torchrun(tmp_path, zsbir_cache, f"paths.output_dir={outputs}", *DIST_OVERRIDES)

    run_dirs = [p for p in (outputs / "runs" / "synthetic" / "triplet_baseline").iterdir()]
    assert len(run_dirs) == 1, run_dirs  # rank 1 trained in rank 0's directory
    assert [p.parent for p in outputs.rglob("metrics.json")] == run_dirs
    metrics = json.loads((run_dirs[0] / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["n_queries"] == 45 and metrics["n_gallery"] == 45  # every item once, padding dropped
    # Each rank trained on half of the batches: 2 steps per epoch per rank.
    assert metrics["steps"] == 4

    # The same checkpoint evaluated by one process gives the same metrics.
    single = Trainer(compose_cfg(*DIST_OVERRIDES), tmp_path / "single")
    single.encoder.load_state_dict(load_checkpoint(run_dirs[0] / "best.pt")["model"])
    again = single.evaluator.evaluate(single.encoder)
    for key, value in metrics["test"].items():
        assert again[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow  # two 2-process runs: ~40 s
def test_two_process_run_resumes_on_every_rank(tmp_path, zsbir_cache):
    run_dir = tmp_path / "run"
    common = [f"hydra.run.dir={run_dir}", *DIST_OVERRIDES[:-2], "trainer.limit_train_batches=2"]
    torchrun(tmp_path, zsbir_cache, *common, "trainer.max_epochs=1")
    proc = torchrun(tmp_path, zsbir_cache, *common, "trainer.max_epochs=2")
    assert "resumed from" in proc.stdout + proc.stderr and "at step 2" in proc.stdout + proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["world_size"] == 2
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]  # rank 0 logged each step once, continuing after the resume


@pytest.mark.slow  # ~15 s per preset
@pytest.mark.parametrize("experiment", ["dann", "sake", "dsn", "sketch_lvm", "puxim", "zse_sbir"])
def test_every_method_preset_trains_under_two_processes(tmp_path, zsbir_cache, experiment):
    # Loss terms with parameters (domain classifier), memories, cross-rank contrastive gathers
    # and frozen towers all go through the one DDP-wrapped TrainStep.
    run_dir = tmp_path / "run"
    torchrun(tmp_path, zsbir_cache, f"experiment={experiment}", "debug=smoke", f"hydra.run.dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6 and metrics["nonfinite_steps"] == 0
