"""The elementwise ops of a decoder layer: the `LayerOps` protocol every implementation follows,
and `TorchOps`, plain torch op for op as transformers computes it (the reference).

The other implementations: `FlashInferOps` (`flashinfer_ops.py`, CUDA) and `CpuOps`
(`cpu_ops.py`, compiled C); `minisgl_backend.kernels` picks one when the model is built.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F


class LayerOps(Protocol):
    name: str
    needs_cos_sin_cache: bool
    fused_prologue: bool  # `attention_prologue` has a kernel (it may still decline some tensors)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dim of x ([T, D], or [T, H, D] for per-head q/k norm)."""

    def rms_norm_over(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """`rms_norm`, written over x where the kernel can (keeps K next to V in the qkv output)."""

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual); may reuse the storage of x and residual."""

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 2d] (gate, up) -> silu(gate) * up."""

    def rope_inputs(self, rotary: Any, positions: torch.Tensor) -> Any:
        """What `apply_rope` needs for this batch, computed once per forward (not per layer)."""

    def apply_rope(self, q: torch.Tensor, k: torch.Tensor, rope: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox rope on q [T, Hq, D] and k [T, Hkv, D]; may rotate them in place."""

    def attention_prologue(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
                           k_weight: torch.Tensor | None, eps: float, rope: Any, k_pool: torch.Tensor,
                           v_pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
        """Per-head RMSNorm of q and k (when weights are given), rope, and k / v written to the
        pools [slots, Hkv, D] at `slots`, in one kernel: returns q (contiguous), or None where
        these ops have no such kernel for these tensors (the caller then runs the steps apart)."""


class TorchOps:
    """Plain torch, op for op as transformers computes it (float32 statistics, cast back)."""

    name = "torch"
    needs_cos_sin_cache = False
    fused_prologue = False

    def attention_prologue(self, *args: Any) -> None:
        return None  # the reference runs norm, rope and store one by one

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and weight.dtype == torch.float32:
            # torch's one-op RMSNorm: bit for bit the formula below in float32, a few ops fewer
            return F.rms_norm(x, weight.shape, weight, eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x.to(dtype)

    def rms_norm_over(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        residual = residual + x
        return self.rms_norm(residual, weight, eps), residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_inputs(self, rotary: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos [T, 1, D] and the signed sin [-sin, sin] [T, 1, D], in the model's dtype.

        HF multiplies rotate_half(x) = [-x2, x1] by sin = [s, s]; [x2, x1] * [-s, s] is the same
        product bit for bit (negation is exact), and [x2, x1] is one roll of x.
        """
        freqs = (positions.float().unsqueeze(-1) * rotary.inv_freq).unsqueeze(1)
        c, s = freqs.cos(), freqs.sin()
        return torch.cat((c, c), dim=-1).to(rotary.dtype), torch.cat((-s, s), dim=-1).to(rotary.dtype)

    def apply_rope(self, q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        cos, signed_sin = rope
        qk = _joint_heads(q, k)
        if qk is not None:  # q and k side by side in the qkv output: rotate them in one pass
            out = _rotate(qk, cos, signed_sin)
            return out[:, : q.shape[1]], out[:, q.shape[1]:]
        return _rotate(q, cos, signed_sin), _rotate(k, cos, signed_sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _joint_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """A [T, Hq + Hkv, D] view over q and k when k's heads directly follow q's in memory."""
    head_dim = q.shape[-1]
    if (q.dim() != 3 or q.stride() != k.stride() or q.stride(1) != head_dim or q.stride(2) != 1
            or q.dtype != k.dtype or q.shape[0] != k.shape[0]
            or k.data_ptr() != q.data_ptr() + q.shape[1] * head_dim * q.element_size()):
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], head_dim), q.stride())
