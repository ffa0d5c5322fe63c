"""Attention backends: torch (the reference), torch with a compiled paged attention kernel (the CPU path),
and, on CUDA, flashinfer. Which one an engine builds: `minisgl_backend.kernels`."""

from __future__ import annotations

from minisgl_backend.attention.base import AttentionBackend, BatchLayout

__all__ = ["AttentionBackend", "BatchLayout"]
