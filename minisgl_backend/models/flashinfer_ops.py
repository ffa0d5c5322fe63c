"""`FlashInferOps`: the decoder layer's elementwise ops as flashinfer's fused CUDA kernels (RMSNorm,
residual add + RMSNorm in one kernel, rope in place, SiLU-and-mul), and the attention prologue in
one Triton kernel (`attention_prologue.py`) where `minisgl_backend.kernels` found that it can run.

flashinfer is imported when `FlashInferOps` is constructed, i.e. only where it was chosen.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from minisgl_backend.models.attention_prologue import layout_problem

logger = logging.getLogger(__name__)

# `attention_prologue.attention_prologue`'s signature: (q, k, v, q_weight, k_weight, eps, positions,
# cos_sin_cache, k_pool, v_pool, slots) -> q
PrologueKernel = Callable[..., torch.Tensor]


class FlashInferOps:
    """flashinfer's norm / rope / activation kernels (CUDA, fp16 / bf16); `prologue`: the fused
    attention prologue kernel, or None (the layers then run norm, rope and store apart)."""

    name = "flashinfer"
    needs_cos_sin_cache = True  # [max_positions, head_dim] float32: cos half, then sin half

    def __init__(self, prologue: PrologueKernel | None = None) -> None:
        import flashinfer.activation
        import flashinfer.norm
        import flashinfer.rope

        self._norm, self._rope, self._act = flashinfer.norm, flashinfer.rope, flashinfer.activation
        self._prologue = prologue
        self._prologue_proven = False  # one call succeeded: later failures are bugs, and raise

    @property
    def fused_prologue(self) -> bool:
        return self._prologue is not None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._norm.rmsnorm(x, weight, eps)

    def rms_norm_over(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # each warp reads a whole head row before it writes it back: safe in place
        return self._norm.rmsnorm(x, weight, eps, out=x)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        self._norm.fused_add_rmsnorm(x, residual, weight, eps)  # residual += x; x = norm(residual)
        return x, residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._act.silu_and_mul(x)

    def rope_inputs(self, rotary: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return positions, rotary.cos_sin_cache

    def apply_rope(self, q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        positions, cos_sin_cache = rope
        # q / k may be strided views of the fused qkv output: the kernel takes row and head strides
        self._rope.apply_rope_with_cos_sin_cache_inplace(
            positions, q.flatten(-2), k.flatten(-2), q.shape[-1], cos_sin_cache, is_neox=True)
        return q, k

    def attention_prologue(self, q, k, v, q_weight, k_weight, eps, rope, k_pool, v_pool, slots):
        if self._prologue is None or layout_problem(q, k, v) is not None:
            return None
        positions, cos_sin_cache = rope
        args = (q, k, v, q_weight, k_weight, eps, positions, cos_sin_cache, k_pool, v_pool, slots)
        if self._prologue_proven:
            return self._prologue(*args)
        try:  # the first call compiles the kernel (Triton JIT): where that fails, serve without it
            q_out = self._prologue(*args)
        except Exception as exc:
            logger.error("the fused attention prologue failed at its first use (%s: %s); the layers run "
                         "norm, rope and the K/V store as separate kernels", type(exc).__name__, exc)
            self._prologue = None
            return None
        self._prologue_proven = True
        return q_out
