"""Attention backends: torch (the reference), torch with a compiled paged attention kernel (the CPU path),
and, on CUDA, flashinfer."""

from __future__ import annotations

import torch

from minisgl_backend.attention.base import AttentionBackend, BatchLayout
from minisgl_backend.attention.cpu_kernels import PagedAttentionKernel, paged_attention_kernel
from minisgl_backend.config import ConfigError, EngineConfig
from minisgl_backend.kvcache import KVCache


def make_attention_backend(config: EngineConfig, kv_cache: KVCache, page_table: torch.Tensor, *,
                           num_qo_heads: int, num_kv_heads: int, head_dim: int,
                           dtype: torch.dtype) -> AttentionBackend:
    """flashinfer where it can run (CUDA, fp16/bf16, a supported head size), else torch; on a
    float32 CPU pool, torch with the compiled paged attention kernel (`cpu`) unless `torch` is asked."""
    from minisgl_backend.attention.torch_backend import TorchAttentionBackend

    name, device = config.attention_backend, page_table.device
    if name in ("auto", "flashinfer"):
        from minisgl_backend.attention.flashinfer_backend import FlashInferBackend, flashinfer_unsupported_reason

        reason = flashinfer_unsupported_reason(head_dim, dtype, device)  # checks the device before importing
        if reason is None:
            return FlashInferBackend(kv_cache, page_table, num_qo_heads, num_kv_heads, head_dim, dtype, device,
                                     config.scheduler.max_running_requests, decode_kernel=config.decode_attention,
                                     pdl=config.pdl)
        if name == "flashinfer":
            raise ConfigError(f"attention_backend 'flashinfer' cannot run here: {reason}")
    return TorchAttentionBackend(kv_cache, page_table, _cpu_kernel(name, kv_cache, page_table))


def _cpu_kernel(name: str, kv_cache: KVCache, page_table: torch.Tensor) -> PagedAttentionKernel | None:
    """The compiled paged attention kernel for `auto` / `cpu` on a float32 CPU pool, else None."""
    if name not in ("auto", "cpu"):
        return None
    pool_dtype = kv_cache.k[0].dtype if kv_cache.k else None
    reason = None
    if page_table.device.type != "cpu" or pool_dtype != torch.float32 or page_table.dtype != torch.int32:
        reason = f"it takes a float32 KV pool on the CPU (here {pool_dtype} on {page_table.device})"
    kernel = None if reason else paged_attention_kernel()
    if kernel is None and name == "cpu":
        raise ConfigError(f"attention_backend 'cpu' cannot run here: {reason or 'the kernel did not build (see the log)'}")
    return kernel


__all__ = ["AttentionBackend", "BatchLayout", "make_attention_backend"]
