"""The Triton kernels behind `triton_decode.py` (imported only where triton is installed).

`decode_split_kernel`: one program per (request, KV head, split). It attends the GROUP query heads
that share the KV head to positions [split * chunk, (split + 1) * chunk) of the request, chunk =
ceil(length / num_splits), reading each position's KV slot from the page table row. Unsplit
(SPLIT false, one split) it writes the output; otherwise each split's normalised output and
log-sum-exp. The split count is a runtime argument: two compiled variants serve every batch size.
`decode_merge_kernel`: one program per (request, query head), the splits weighted by their
log-sum-exp. Left undecorated: `triton_decode.decode_kernels()` jits them.
"""

import triton.language as tl


def decode_split_kernel(q_ptr, k_pool_ptr, v_pool_ptr, slot_table_ptr, rows_ptr, seq_lens_ptr,
                        part_out_ptr, part_lse_ptr, out_ptr, table_width, sm_scale, num_splits,
                        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(rows_ptr + b).to(tl.int64)
    length = tl.load(seq_lens_ptr + b).to(tl.int32)
    chunk = tl.cdiv(length, num_splits)
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    g_mask = g < GROUP
    heads = kv_head * GROUP + g
    q_rows = b * (NUM_KV_HEADS * GROUP) + heads
    q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + d[None, :], mask=g_mask[:, None], other=0.0)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    # pipelined (cp.async): the next tiles' slots and K/V load while this one computes
    for n0 in tl.range(start, end, BLOCK_N, num_stages=3):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        slot = tl.load(slot_table_ptr + row * table_width + n, mask=n_mask, other=0).to(tl.int64)
        kv = (slot * NUM_KV_HEADS + kv_head)[:, None] * HEAD_DIM + d[None, :]
        # an fp8 pool (kv_cache_dtype fp8) is read at half the bytes and widened to q's dtype
        k = tl.load(k_pool_ptr + kv, mask=n_mask[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_pool_ptr + kv, mask=n_mask[:, None], other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k)) * sm_scale
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    safe_l = tl.where(l > 0, l, 1.0)
    if not SPLIT:
        out = acc / safe_l[:, None]
        tl.store(out_ptr + q_rows[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_mask[:, None])
    else:
        parts = q_rows * num_splits + split
        tl.store(part_out_ptr + parts[:, None] * HEAD_DIM + d[None, :], acc / safe_l[:, None], mask=g_mask[:, None])
        lse = tl.where(l > 0, m + tl.log(safe_l), float("-inf"))
        tl.store(part_lse_ptr + parts, lse, mask=g_mask)


def decode_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_splits,
                        HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
    q_row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS_PAD)
    s_mask = s < num_splits
    lse = tl.load(part_lse_ptr + q_row * num_splits + s, mask=s_mask, other=float("-inf"))
    weight = tl.exp(lse - tl.max(lse, 0))  # split 0 is never empty: the maximum is finite
    weight = weight / tl.sum(weight, 0)
    d = tl.arange(0, HEAD_DIM)
    parts = tl.load(part_out_ptr + (q_row * num_splits + s)[:, None] * HEAD_DIM + d[None, :],
                    mask=s_mask[:, None], other=0.0)
    out = tl.sum(parts * weight[:, None], 0)
    tl.store(out_ptr + q_row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))
