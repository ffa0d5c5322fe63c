"""Process-group set-up for tensor parallelism: NCCL on CUDA, gloo on CPU, over the group's store.

On the CPU the group is gloo through a backend registered here (`minisgl_gloo`), so that its
listening address can be this node's `node_addr` (torch's own gloo takes only an interface
name, GLOO_SOCKET_IFNAME, which it still honours when `node_addr` is empty). NCCL picks its
interfaces itself (NCCL_SOCKET_IFNAME).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from minisgl_backend.config import EngineConfig
from minisgl_backend.distributed.parallel_state import init_tp
from minisgl_backend.distributed.store import key

CPU_BACKEND = "minisgl_gloo"
_node_addr = ""  # this process's gloo listening address (one process, one group)


def init_distributed(config: EngineConfig, rank: int, store: dist.Store | None) -> Callable[[int], int]:
    """Join the TP group of `config` as global `rank` through `store` (the group's TCP store;
    None only when tp_size is 1); returns a function that takes this rank's value and gives the
    minimum over all ranks (used to size the KV pool that every rank can hold)."""
    par = config.parallel
    if par.tp_size > 1:
        if store is None:
            raise RuntimeError("tp_size > 1 needs the group's store")
        if config.device == "cuda":
            torch.cuda.set_device(local_rank(config, rank) % torch.cuda.device_count())
            backend = "nccl"
        else:
            backend = _register_cpu_backend(par.node_addr)
        dist.init_process_group(backend, store=dist.PrefixStore(key("tp", ""), store), rank=rank,
                                world_size=par.tp_size, timeout=timedelta(seconds=par.dist_timeout_s))
    init_tp(rank, par.tp_size)
    return lambda value: min_over_ranks(value, config.device)


def local_rank(config: EngineConfig, rank: int) -> int:
    """The rank's index among its node's ranks."""
    return rank - config.parallel.node_rank * config.parallel.ranks_per_node


def _register_cpu_backend(node_addr: str) -> str:
    global _node_addr
    _node_addr = node_addr
    if not hasattr(dist.Backend, CPU_BACKEND.upper()):
        dist.Backend.register_backend(CPU_BACKEND, _create_gloo, devices=["cpu"])
    return CPU_BACKEND


def _create_gloo(store: dist.Store, rank: int, size: int, timeout: timedelta) -> dist.ProcessGroupGloo:
    gloo = dist.ProcessGroupGloo
    if not _node_addr:
        return gloo(store, rank, size, timeout)
    options = gloo._Options()
    options._devices = [gloo.create_device(hostname=_node_addr)]
    options._timeout = timeout
    return gloo(store, rank, size, options)


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
