"""Tensor parallelism: per-process TP state, collectives and the TP-sharded layers."""

from minisgl_backend.distributed.parallel_state import (
    all_gather_last_dim,
    all_reduce,
    get_tp_rank,
    get_tp_size,
    init_tp,
)

__all__ = ["init_tp", "get_tp_rank", "get_tp_size", "all_reduce", "all_gather_last_dim"]
