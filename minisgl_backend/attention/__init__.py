"""Attention backends: torch (CPU path and reference) and, on CUDA, flashinfer."""

from __future__ import annotations

import torch

from minisgl_backend.attention.base import AttentionBackend, BatchLayout
from minisgl_backend.config import ConfigError, EngineConfig
from minisgl_backend.engine.kv_cache import KVCache


def make_attention_backend(config: EngineConfig, kv_cache: KVCache, page_table: torch.Tensor) -> AttentionBackend:
    from minisgl_backend.attention.torch_backend import TorchAttentionBackend

    name = config.attention_backend
    if name == "flashinfer":
        raise ConfigError("attention_backend 'flashinfer' is not built yet; use 'torch' or 'auto'")
    return TorchAttentionBackend(kv_cache, page_table)


__all__ = ["AttentionBackend", "BatchLayout", "make_attention_backend"]
