"""Tensor-parallel state of this process and the two collectives the TP layers need.

The process group itself is created by the launcher (`torch.distributed.init_process_group`,
gloo on CPU / nccl on CUDA); this module only records this rank's place in it and calls the
collectives on the default group. With `tp_size == 1` every collective is the identity and
`torch.distributed` is never touched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_TP_RANK = 0
_TP_SIZE = 1


def init_tp(rank: int, size: int) -> None:
    """Record this process's tensor-parallel rank and the group size."""
    global _TP_RANK, _TP_SIZE
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"invalid tensor-parallel rank {rank} for tp_size {size}")
    if size > 1 and not dist.is_initialized():
        raise RuntimeError("tp_size > 1 needs torch.distributed.init_process_group() first")
    if size > 1 and dist.get_world_size() != size:
        raise RuntimeError(f"tp_size {size} does not match the process group size {dist.get_world_size()}")
    _TP_RANK, _TP_SIZE = rank, size


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over all ranks, in place; returns `x`."""
    if _TP_SIZE == 1:
        return x
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along the last dim, in rank order."""
    if _TP_SIZE == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)
