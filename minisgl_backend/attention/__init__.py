"""Attention backends: torch (CPU path and reference) and, on CUDA, flashinfer."""

from __future__ import annotations

import torch

from minisgl_backend.attention.base import AttentionBackend, BatchLayout
from minisgl_backend.config import ConfigError, EngineConfig
from minisgl_backend.kvcache import KVCache


def make_attention_backend(config: EngineConfig, kv_cache: KVCache, page_table: torch.Tensor, *,
                           num_qo_heads: int, num_kv_heads: int, head_dim: int,
                           dtype: torch.dtype) -> AttentionBackend:
    """flashinfer where it can run (CUDA, fp16/bf16, a supported head size), else torch."""
    from minisgl_backend.attention.torch_backend import TorchAttentionBackend

    name, device = config.attention_backend, page_table.device
    if name in ("auto", "flashinfer"):
        from minisgl_backend.attention.flashinfer_backend import FlashInferBackend, flashinfer_unsupported_reason

        reason = flashinfer_unsupported_reason(head_dim, dtype, device)  # checks the device before importing
        if reason is None:
            return FlashInferBackend(kv_cache, page_table, num_qo_heads, num_kv_heads, head_dim, dtype, device,
                                     config.scheduler.max_running_requests)
        if name == "flashinfer":
            raise ConfigError(f"attention_backend 'flashinfer' cannot run here: {reason}")
    return TorchAttentionBackend(kv_cache, page_table)


__all__ = ["AttentionBackend", "BatchLayout", "make_attention_backend"]
