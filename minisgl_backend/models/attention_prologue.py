"""A decoder layer's attention prologue in one Triton kernel (CUDA): per-head RMSNorm of q and k
(Qwen3's q_norm / k_norm, where the model has them), neox rope on both, and the new tokens' K/V
written into the paged pool; q comes out contiguous, as the attention kernel takes it.

Unfused that is q_norm, k_norm, rope and the K/V store, or, without the norms, rope, the store
and a copy of the strided q: three to four kernels per layer, which at small batches cost more in
launches (and CUDA-graph nodes) than in memory traffic. Here one program handles one head of one
token.

Numerics follow the unfused flashinfer path: the norm in float32 with one rounding to the
activation dtype (what the norm kernel writes), rope in float32 on that, one rounding.

Whether the kernel can run here (triton installed, fp16 / bf16, a power-of-two head size, the KV
dtype on this GPU) is decided once by `minisgl_backend.kernels`; at call time `layout_problem`
only checks the tensors' layout. `triton` is imported only by `prologue_kernel()` (the kernel
itself lives in `attention_prologue_kernel.py`). Under TRITON_INTERPRET=1 (set before triton is
imported) the same kernel runs in Triton's interpreter on CPU tensors: the tests check it that
way on machines without a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from minisgl_backend.kvcache.pool import FP8_DTYPES


@functools.lru_cache(maxsize=1)
def prologue_kernel() -> Any:
    """The jitted kernel (compiled per head layout at its first launch; in a process started with
    TRITON_INTERPRET=1, Triton's interpreter, which takes CPU tensors)."""
    import triton

    from minisgl_backend.models.attention_prologue_kernel import attention_prologue_kernel

    # the per-batch index tensors may be slices of a packed staging buffer: one compiled variant
    # whatever their alignment (no recompile in the middle of serving)
    return triton.jit(attention_prologue_kernel, do_not_specialize_on_alignment=["positions_ptr", "slots_ptr"])


def layout_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these tensors cannot go through the kernel, or None: it takes [T, H, D] views with the
    heads of a token side by side (the qkv output's q / k / v views are)."""
    head_dim = q.shape[-1]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != head_dim:
            return f"{name} of shape {tuple(x.shape)} and strides {x.stride()}"
    return None


def attention_prologue(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
                       k_weight: torch.Tensor | None, eps: float, positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                       slots: torch.Tensor) -> torch.Tensor:
    """q [T, Hq, D], k / v [T, Hkv, D] -> q normed (when weights are given) and rotated, as a new
    contiguous tensor; k normed and rotated and v written to the pools [slots, Hkv, D] at `slots`.
    The caller checks `layout_problem` first."""
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = torch.empty((tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if tokens == 0:
        return q_out
    has_norm = q_weight is not None
    kernel = prologue_kernel()
    kernel[(tokens, num_q_heads + num_kv_heads)](
        q, k, v, q.stride(0), k.stride(0), v.stride(0),
        q_weight if has_norm else q, k_weight if has_norm else q, float(eps), positions, cos_sin_cache,
        q_out, k_pool, v_pool, slots,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=head_dim // 2,
        HAS_NORM=has_norm, KV_LIMIT=torch.finfo(k_pool.dtype).max if k_pool.dtype in FP8_DTYPES else 0.0,
        num_warps=1)
    return q_out
