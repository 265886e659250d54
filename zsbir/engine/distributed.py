"""Process-group helpers that also work when torch.distributed is not initialised.

`init_distributed(cfg)` starts the process group from the launcher's environment:
`torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or SLURM `srun` /
submitit (SLURM_PROCID, SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID; the master is
the first host of SLURM_JOB_NODELIST). NCCL when the run uses GPUs (one per process: cuda:LOCAL_RANK),
gloo on CPU. A single process (no launcher) runs without a process group.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from zsbir.errors import ZsbirError

log = logging.getLogger("zsbir.train")


class DistributedSetupError(ZsbirError):
    """The launcher's environment does not describe a usable process group."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


_local_rank = 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return _local_rank if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_ranks_true(flag: bool) -> bool:
    """True when `flag` holds on every rank (a decision all ranks must take together)."""
    if not is_initialized() or world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_from_main(obj):
    """Rank 0's `obj` (any picklable value) on every rank."""
    if not is_initialized() or world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _int_env(env: dict, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise DistributedSetupError(f"environment variable {key}={env[key]!r} is not an integer") from None


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`node[01-04,07],gpu5` -> `node01`).

    `scontrol show hostnames` is the authority when it is installed; the fallback parses
    the common `prefix[range,...]` form.
    """
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not first:
        raise DistributedSetupError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    prefix, ranges = first.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def launch_env(env: dict | None = None) -> LaunchEnv | None:
    """The process group described by torchrun's or SLURM's variables; None for a single process."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also wins inside a SLURM job)
        world = _int_env(env, "WORLD_SIZE")
        if world <= 1:
            return None
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise DistributedSetupError(f"RANK and WORLD_SIZE are set but {missing} are not; launch with torchrun "
                                        "or set MASTER_ADDR and MASTER_PORT")
        return LaunchEnv(_int_env(env, "RANK"), world, int(env.get("LOCAL_RANK", 0)), env["MASTER_ADDR"],
                         _int_env(env, "MASTER_PORT"), "torchrun")
    tasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"  # the srun step's, when set
    if "SLURM_PROCID" in env and tasks_key in env:
        world = _int_env(env, tasks_key)
        if world <= 1:
            return None
        addr = env.get("MASTER_ADDR") or slurm_first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        # A port derived from the job id: tasks of one job agree on it, concurrent jobs rarely collide.
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000
        return LaunchEnv(_int_env(env, "SLURM_PROCID"), world, int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return None


def init_distributed(cfg) -> LaunchEnv | None:
    """Join the process group the launcher describes (no-op for a single process).

    `trainer.distributed=off` ignores launcher variables (e.g. a one-task step inside a
    multi-task SLURM allocation).
    """
    global _local_rank
    tcfg = cfg.trainer
    if str(tcfg.get("distributed", "auto")) == "off" or is_initialized():
        return None
    launch = launch_env()
    if launch is None:
        return None
    use_cuda = str(tcfg.device) != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if launch.local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"local rank {launch.local_rank} has no GPU (this node has {torch.cuda.device_count()}); start at "
                "most one process per GPU (torchrun --nproc_per_node / SLURM --ntasks-per-node)")
        torch.cuda.set_device(launch.local_rank)
    backend = "nccl" if use_cuda else "gloo"
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    timeout = timedelta(seconds=float(tcfg.get("dist_timeout_s") or 1800))
    try:
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=launch.rank, world_size=launch.world_size, timeout=timeout,
                                device_id=torch.device("cuda", launch.local_rank) if use_cuda else None)
    except (RuntimeError, ValueError) as err:
        raise DistributedSetupError(
            f"cannot join the {backend} process group of {launch.world_size} processes at "
            f"{launch.master_addr}:{launch.master_port} (rank {launch.rank}, launched by {launch.launcher}): {err}. "
            "Check that every process was started and the port is free, or run one process with "
            "trainer.distributed=off") from err
    _local_rank = launch.local_rank
    if launch.rank == 0:
        log.info("distributed: %d processes (%s, %s)", launch.world_size, backend, launch.launcher)
    return launch


def destroy_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


def local_device(requested: torch.device) -> torch.device:
    """This process's GPU under a process group (cuda:LOCAL_RANK); `requested` otherwise."""
    if requested.type == "cuda" and is_initialized():
        return torch.device("cuda", local_rank())
    return requested


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (any number of rows per rank) from every rank in rank order, on every rank.

    Ranks may hold different row counts: each pads to the largest, the padding is dropped
    after the all_gather. No gradient. The identity without a process group.
    """
    if not is_initialized() or world_size() == 1:
        return x
    device = _collective_device()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.long, device=device))
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[:x.shape[0]] = x.to(device)
    pieces = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n] for piece, n in zip(pieces, counts)]).to(x.device)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank (rank order) along dim 0, keeping the autograd graph.

    The gradient of each rank's slice flows back to that rank (torch.distributed.nn's
    all_gather sums the incoming gradients across ranks in its backward). Every rank must
    pass a tensor of the same shape. The identity when torch.distributed is not initialised.
    """
    if not is_initialized() or world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)
