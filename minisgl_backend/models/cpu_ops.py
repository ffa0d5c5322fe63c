"""`CpuOps`: the decoder layer's elementwise ops as compiled C on the CPU (float32), one call each
(`cpu/csrc/layer_ops.c`): RMSNorm, residual add + RMSNorm in place, neox rope in place,
SiLU-and-mul. At decode sizes (tens of rows) the torch reference spends more on dispatching its
3-10 ops per layer op than on the arithmetic; these take one call and no temporaries.

Layouts the kernels do not take (another dtype, a non-unit inner stride) go to `TorchOps`.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from minisgl_backend.models.torch_ops import TorchOps

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "rms_norm_f32": [_P, _I, _I, _I, _I, _P, _I, _I, _I, _P, _F],
    "add_rms_norm_f32": [_P, _I, _P, _I, _I, _I, _P, _F],
    "rope_neox_f32": [_P, _I, _I, _I, _P, _I, _I, _I, _P, _I, _P, _I],
    "silu_and_mul_f32": [_P, _I, _I, _I, _P],
    "attention_prologue_f32": [_P, _I, _I, _P, _I, _P, _I, _I, _I, _I, _P, _P, _F, _P, _P, _P, _P, _P, _P],
}


def _fits(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """float32 on the CPU with a unit inner stride (written out: this runs several times a layer)."""
    return (x.dtype == torch.float32 and x.is_cpu and x.stride(-1) == 1
            and (weight is None or (weight.dtype == torch.float32 and weight.is_cpu and weight.is_contiguous())))


def _as_heads(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(tokens, heads, token stride, head stride) of [T, D] or [T, H, D]."""
    if x.dim() == 2:
        return x.shape[0], 1, x.stride(0), x.shape[1]
    return x.shape[0], x.shape[1], x.stride(0), x.stride(1)


class CpuOps:
    name = "cpu"
    needs_cos_sin_cache = True  # [max_positions, head_dim] float32: cos half, then sin half
    fused_prologue = True

    def __init__(self, library: ctypes.CDLL) -> None:
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(library, name)
            fn.argtypes, fn.restype = argtypes, None
            setattr(self, f"_{name}", fn)  # e.g. self._rms_norm_f32
        self._torch = TorchOps()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not _fits(x, weight) or x.dim() not in (2, 3):
            return self._torch.rms_norm(x, weight, eps)
        out = torch.empty(x.shape, dtype=x.dtype)
        return self._norm_into(x, out, weight, eps)

    def rms_norm_over(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not _fits(x, weight) or x.dim() not in (2, 3):
            return self._torch.rms_norm(x, weight, eps)
        return self._norm_into(x, x, weight, eps)

    def _norm_into(self, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        tokens, heads, x_st, x_sh = _as_heads(x)
        _, _, o_st, o_sh = _as_heads(out)
        self._rms_norm_f32(x.data_ptr(), tokens, heads, x_st, x_sh, out.data_ptr(), o_st, o_sh,
                           x.shape[-1], weight.data_ptr(), eps)
        return out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """In place, like flashinfer's fused_add_rmsnorm: residual += x, then x = norm(residual)."""
        if not (_fits(x, weight) and _fits(residual)) or x.dim() != 2 or x.shape != residual.shape:
            return self._torch.add_rms_norm(x, residual, weight, eps)
        self._add_rms_norm_f32(x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0),
                               x.shape[0], x.shape[1], weight.data_ptr(), eps)
        return x, residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if not _fits(x) or x.dim() != 2:
            return self._torch.silu_and_mul(x)
        d = x.shape[1] // 2
        out = torch.empty(x.shape[0], d, dtype=x.dtype)
        self._silu_and_mul_f32(x.data_ptr(), x.stride(0), x.shape[0], d, out.data_ptr())
        return out

    def rope_inputs(self, rotary: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return positions.to(torch.int64).contiguous(), rotary.cos_sin_cache

    def apply_rope(self, q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        positions, cos_sin = rope
        if not (_fits(q) and _fits(k) and _fits(cos_sin)) or q.dim() != 3 or k.dim() != 3:
            raise ValueError(f"rope takes float32 [T, H, D] q / k with unit inner stride, got "
                             f"{q.dtype} {tuple(q.stride())} / {k.dtype} {tuple(k.stride())}")
        self._rope_neox_f32(q.data_ptr(), q.stride(0), q.stride(1), q.shape[1],
                            k.data_ptr(), k.stride(0), k.stride(1), k.shape[1],
                            positions.data_ptr(), q.shape[0], cos_sin.data_ptr(), q.shape[2])
        return q, k

    def attention_prologue(self, q, k, v, q_weight, k_weight, eps, rope, k_pool, v_pool, slots):
        positions, cos_sin = rope
        if not (_heads_side_by_side(q, k, v, k_pool, v_pool) and _fits(cos_sin)
                and slots.dtype == torch.int64 and slots.is_contiguous()
                and (q_weight is None or (_fits(q_weight) and _fits(k_weight)))):
            return None
        tokens, q_heads, dim = q.shape
        q_out = torch.empty(q.shape, dtype=q.dtype)
        weights = (None, None) if q_weight is None else (q_weight.data_ptr(), k_weight.data_ptr())  # NULL: no norm
        self._attention_prologue_f32(
            q.data_ptr(), q.stride(0), q_heads, k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
            k.shape[1], tokens, dim, *weights, eps, positions.data_ptr(), cos_sin.data_ptr(),
            q_out.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), slots.data_ptr())
        return q_out


def _heads_side_by_side(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                        v_pool: torch.Tensor) -> bool:
    """float32 [T, H, D] views whose heads follow each other (the qkv output's q / k / v), and
    contiguous pools [slots, Hkv, D]."""
    dim = q.shape[-1]
    return (all(_fits(x) and x.dim() == 3 and x.stride(1) == dim for x in (q, k, v))
            and all(_fits(p) and p.is_contiguous() for p in (k_pool, v_pool)))
