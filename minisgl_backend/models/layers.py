"""Replicated building blocks: RMSNorm, rotary embedding, SiLU-and-mul, computed by the model's
`LayerOps` (torch: numerically as in HF; flashinfer: fused CUDA kernels)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from minisgl_backend.distributed.layers import default_weight_loader
from minisgl_backend.models.torch_ops import LayerOps, TorchOps


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6, dtype: torch.dtype | None = None,
                 ops: LayerOps | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.ops = ops or TorchOps()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def forward_over(self, x: torch.Tensor) -> torch.Tensor:
        """The norm, written over x where the ops can."""
        return self.ops.rms_norm_over(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused into the norm where the ops can."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class SiluAndMul(nn.Module):
    """[..., 2 * d] (gate, up) -> silu(gate) * up."""

    def __init__(self, ops: LayerOps | None = None) -> None:
        super().__init__()
        self.ops = ops or TorchOps()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, for rope_type default, linear or llama3.

    Computed on the CPU, as transformers does, so that they are bit-identical to its own."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rope (rotate_half over the two halves of each head), cos/sin in float32.

    `prepare(positions)` once per forward, then `apply(q, k, prepared)` in every layer."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None, *,
                 max_positions: int = 0, dtype: torch.dtype = torch.float32, ops: LayerOps | None = None) -> None:
        super().__init__()
        self.head_dim, self.dtype = head_dim, dtype
        self.ops = ops or TorchOps()
        inv_freq = rope_inv_freq(head_dim, theta, scaling).to(torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if self.ops.needs_cos_sin_cache:
            freqs = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq
            self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def prepare(self, positions: torch.Tensor) -> Any:
        return self.ops.rope_inputs(self, positions)

    def apply(self, q: torch.Tensor, k: torch.Tensor, prepared: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] -> rotated (possibly in place)."""
        return self.ops.apply_rope(q, k, prepared)
