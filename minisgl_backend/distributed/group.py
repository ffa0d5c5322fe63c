"""Process-group set-up for tensor parallelism: NCCL on CUDA, gloo on CPU."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from minisgl_backend.config import EngineConfig
from minisgl_backend.distributed.parallel_state import init_tp


def init_distributed(config: EngineConfig, rank: int) -> Callable[[int], int]:
    """Join the TP group of `config` as `rank`; returns a function that takes this rank's value
    and gives the minimum over all ranks (used to size the KV pool that every rank can hold)."""
    size = config.parallel.tp_size
    if size > 1:
        backend = "nccl" if config.device == "cuda" else "gloo"
        if config.device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://{config.parallel.master_addr}:{config.parallel.master_port}",
                                rank=rank, world_size=size)
    init_tp(rank, size)
    return lambda value: min_over_ranks(value, config.device)


def min_over_ranks(value: int, device: str) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def destroy_distributed() -> None:
    """Leave the TP group (engine shutdown); a no-op without one."""
    if dist.is_initialized():
        dist.destroy_process_group()
