"""Paged decode attention in Triton that needs no planning on the host.

flashinfer's decode kernel takes a CSR list of page ids built per batch (`build_paged_metadata`)
and a `plan()` per step, both host work on every decode step. Here the kernel reads the page
table itself: each position's KV slot from the request's row, up to its length. Its inputs are
the batch's rows and lengths on the device (a CUDA graph's static buffer), so a captured decode
step needs nothing from the host but its one copy in.

Split-KV for small batches (flash-decoding): `num_splits(batch)` splits each request's positions
so that about two programs per SM run; the merge kernel combines the splits by their log-sum-exp.
One split (large batches) writes the output directly: one kernel per layer.

The kernels live in `triton_decode_kernel.py`; `triton` is imported only when they are used, and
whether they can run here is decided by `minisgl_backend.kernels`. Under TRITON_INTERPRET=1 (set
before triton is imported) they run in Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

MAX_SPLITS = 16
BLOCK_N = 32


@functools.lru_cache(maxsize=1)
def decode_kernels() -> tuple[Any, Any]:
    import triton

    from minisgl_backend.attention.triton_decode_kernel import decode_merge_kernel, decode_split_kernel

    # rows / lengths are slices of a packed buffer: one compiled variant whatever their alignment;
    # the split count is not specialised on either (one variant per SPLIT, whatever the batch)
    split = triton.jit(decode_split_kernel, do_not_specialize=["num_splits"],
                       do_not_specialize_on_alignment=["rows_ptr", "seq_lens_ptr"])
    return split, triton.jit(decode_merge_kernel, do_not_specialize=["num_splits"])


def num_splits(batch_size: int, num_kv_heads: int, sm_count: int) -> int:
    """Splits per request so that batch * KV heads * splits is about two programs per SM."""
    return max(1, min(MAX_SPLITS, math.ceil(2 * sm_count / (batch_size * num_kv_heads))))


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_table: torch.Tensor,
                           rows: torch.Tensor, seq_lens: torch.Tensor, splits: int) -> torch.Tensor:
    """q [B, Hq, D] (one new token per request, contiguous), pools [slots, Hkv, D], slot_table
    [table rows, width] (int32 KV slot of each position), rows / seq_lens [B] on the device ->
    [B, Hq, D]: each request's query heads attending to its positions [0, seq_lens)."""
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in [1, {MAX_SPLITS}], got {splits}")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    split_kernel, merge_kernel = decode_kernels()
    if splits > 1:
        part_out = torch.empty((batch * num_q_heads * splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch * num_q_heads * splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    split_kernel[(batch, num_kv_heads, splits)](
        q, k_pool, v_pool, slot_table, rows, seq_lens, part_out, part_lse, out, slot_table.stride(0),
        1.0 / math.sqrt(head_dim), splits,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(16, 1 << (group - 1).bit_length()),
        HEAD_DIM=head_dim, BLOCK_N=BLOCK_N, SPLIT=splits > 1, num_warps=4)
    if splits > 1:
        merge_kernel[(batch * num_q_heads,)](part_out, part_lse, out, splits, HEAD_DIM=head_dim,
                                            SPLITS_PAD=MAX_SPLITS, num_warps=1)
    return out
