"""The elementwise ops of a decoder layer, implemented once per device: `TorchOps` (plain torch,
numerically as in HF: the reference), `FlashInferOps` (flashinfer's fused CUDA kernels: RMSNorm,
residual-add + RMSNorm in one kernel, rope in place, SiLU-and-mul) and, on the CPU in float32,
`CpuOps` (`cpu_ops.py`: the same fused ops in compiled C).

`select_ops(device, dtype, name)` picks one when the model is built; every layer keeps that
choice. flashinfer is imported only when `FlashInferOps` is constructed, i.e. only on CUDA.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from minisgl_backend.models.attention_prologue import attention_prologue as fused_attention_prologue
from minisgl_backend.models.attention_prologue import triton_installed
from minisgl_backend.models.attention_prologue import unsupported_reason as prologue_unsupported_reason

logger = logging.getLogger(__name__)

FUSED_DTYPES = (torch.float16, torch.bfloat16)


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


class FlashInferOps:
    """flashinfer's norm / rope / activation kernels (CUDA, fp16 / bf16), and with
    `fuse_prologue` (where triton is installed) the attention prologue in one Triton kernel
    (`attention_prologue.py`)."""

    name = "flashinfer"
    needs_cos_sin_cache = True  # [max_positions, head_dim] float32: cos half, then sin half

    def __init__(self, fuse_prologue: bool = True, pdl: bool | None = None) -> None:
        import flashinfer.activation
        import flashinfer.norm
        import flashinfer.rope

        self._norm, self._rope, self._act = flashinfer.norm, flashinfer.rope, flashinfer.activation
        self._pdl = {} if pdl is None else {"enable_pdl": pdl}  # None: flashinfer's default
        self.fused_prologue = fuse_prologue and triton_installed()
        self._prologue_proven = False  # one call succeeded: later failures are bugs, and raise
        if fuse_prologue and not self.fused_prologue:
            logger.warning("the attention prologue runs as separate kernels: triton is not installed")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._norm.rmsnorm(x, weight, eps, **self._pdl)

    def rms_norm_over(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # each warp reads a whole head row before it writes it back: safe in place
        return self._norm.rmsnorm(x, weight, eps, out=x, **self._pdl)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        self._norm.fused_add_rmsnorm(x, residual, weight, eps, **self._pdl)  # residual += x; x = norm(residual)
        return x, residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._act.silu_and_mul(x, **self._pdl)

    def rope_inputs(self, rotary: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return positions, rotary.cos_sin_cache

    def apply_rope(self, q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        positions, cos_sin_cache = rope
        # q / k may be strided views of the fused qkv output: the kernel takes row and head strides
        self._rope.apply_rope_with_cos_sin_cache_inplace(
            positions, q.flatten(-2), k.flatten(-2), q.shape[-1], cos_sin_cache, is_neox=True)
        return q, k

    def attention_prologue(self, q, k, v, q_weight, k_weight, eps, rope, k_pool, v_pool, slots):
        if not self.fused_prologue or prologue_unsupported_reason(q, k, v, k_pool) is not None:
            return None
        positions, cos_sin_cache = rope
        args = (q, k, v, q_weight, k_weight, eps, positions, cos_sin_cache, k_pool, v_pool, slots)
        if self._prologue_proven:
            return fused_attention_prologue(*args)
        try:  # the first call compiles the kernel (Triton JIT): where that fails, serve without it
            q_out = fused_attention_prologue(*args)
        except Exception as exc:
            logger.error("the fused attention prologue failed at its first use (%s: %s); the layers run "
                         "norm, rope and the K/V store as separate kernels", type(exc).__name__, exc)
            self.fused_prologue = False
            return None
        self._prologue_proven = True
        return q_out


def flashinfer_installed() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


def fused_ops_unsupported_reason(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why the fused kernels cannot run here, or None when they can."""
    if torch.device(device).type != "cuda":
        return "not on CUDA"
    if dtype not in FUSED_DTYPES:
        return f"dtype {dtype} (the fused kernels take float16 / bfloat16)"
    if not flashinfer_installed():
        return "flashinfer is not installed"
    return None


def select_ops(device: torch.device | str, dtype: torch.dtype, name: str = "auto",
               fuse_prologue: bool = True, pdl: bool | None = None) -> LayerOps:
    """`auto`: flashinfer's fused kernels on CUDA in half precision, the compiled C ops
    (`cpu_ops.py`) on the CPU in float32, else the torch reference; `torch`: the reference.
    `fuse_prologue`: the attention prologue (q/k norm, rope, K/V store) in one kernel where the
    chosen ops have one (Triton on CUDA, C on the CPU). `pdl`: flashinfer's kernels with
    programmatic dependent launch (None: its default)."""
    if name == "torch":
        return TorchOps()
    reason = fused_ops_unsupported_reason(device, dtype)
    if reason is None:
        return FlashInferOps(fuse_prologue, pdl)
    if torch.device(device).type == "cuda":
        logger.warning("decoder layers use unfused torch ops: %s", reason)
    elif torch.device(device).type == "cpu" and dtype == torch.float32:
        from minisgl_backend.cpu import cpu_library
        from minisgl_backend.models.cpu_ops import CpuOps

        library = cpu_library()
        if library is not None:
            return CpuOps(library, fuse_prologue)
    return TorchOps()
