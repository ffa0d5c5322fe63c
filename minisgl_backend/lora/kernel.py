"""Gathered LoRA matmuls in Triton (CUDA): each program reads its token's slot on the device.

shrink: h[t] = A[slot_t] x[t]   ([R] per token)
expand: y[t, offset:offset + N] += B[slot_t] h[t]
A token of slot -1 (the base model) adds nothing. `triton` is imported only here, at first use;
under TRITON_INTERPRET=1 the same kernels run on CPU tensors (the tests check them that way).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def shrink(x_ptr, a_ptr, slots_ptr, h_ptr, K, R, stride_x, stride_as, stride_ar,
               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slots_ptr + t)
        r = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        if slot >= 0:
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + t * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
                a = tl.load(a_ptr + slot * stride_as + r[:, None] * stride_ar + k[None, :],
                            mask=(r[:, None] < R) & (k[None, :] < K), other=0.0).to(tl.float32)
                acc += tl.sum(a * x[None, :], axis=1)
        tl.store(h_ptr + t * R + r, acc, mask=r < R)

    @triton.jit
    def expand(h_ptr, b_ptr, slots_ptr, y_ptr, N, R, stride_y, offset, stride_bs, stride_bn,
               BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slots_ptr + t)
        if slot >= 0:
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            r = tl.arange(0, BLOCK_R)
            h = tl.load(h_ptr + t * R + r, mask=r < R, other=0.0)
            b = tl.load(b_ptr + slot * stride_bs + n[:, None] * stride_bn + r[None, :],
                        mask=(n[:, None] < N) & (r[None, :] < R), other=0.0).to(tl.float32)
            delta = tl.sum(b * h[None, :], axis=1)
            out = y_ptr + t * stride_y + offset + n
            y = tl.load(out, mask=n < N, other=0.0)
            tl.store(out, (y.to(tl.float32) + delta).to(y.dtype), mask=n < N)

    return triton, shrink, expand


def lora_shrink_expand(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor,
                       y: torch.Tensor, offset: int = 0) -> None:
    """y[:, offset:offset + N] += per token (x A_s^T) B_s^T, in place; x [T, K] and y rows unit-strided."""
    triton, shrink, expand = _kernels()
    tokens, inputs = x.shape
    _, rank, _ = a.shape
    outputs = b.shape[1]
    if tokens == 0:
        return
    h = torch.empty(tokens, rank, dtype=torch.float32, device=x.device)
    block_r = triton.next_power_of_2(rank)
    shrink[(tokens,)](x, a, token_slots, h, inputs, rank, x.stride(0), a.stride(0), a.stride(1),
                      BLOCK_R=block_r, BLOCK_K=64)
    block_n = 64
    expand[(tokens, triton.cdiv(outputs, block_n))](h, b, token_slots, y, outputs, rank, y.stride(0), offset,
                                                    b.stride(0), b.stride(1), BLOCK_N=block_n, BLOCK_R=block_r)
