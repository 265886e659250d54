"""Process-group helpers that also work when torch.distributed is not initialised."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


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
