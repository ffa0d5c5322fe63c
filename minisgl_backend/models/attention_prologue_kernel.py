"""The Triton kernel behind `attention_prologue.py` (imported only where triton is installed).

One program per (token, head): heads [0, NUM_Q_HEADS) are q's, written to the contiguous q_out;
the others are k's, written with v's head of the same index to the pools at the token's slot (cast
to the pools' dtype: fp8 for `kv_cache_dtype` fp8, saturated at `KV_LIMIT`, its largest value).
Left undecorated: `attention_prologue.prologue_kernel()` jits it, or wraps it for the interpreter.
"""

import triton.language as tl


def attention_prologue_kernel(q_ptr, k_ptr, v_ptr, q_stride, k_stride, v_stride,
                              q_weight_ptr, k_weight_ptr, eps, positions_ptr, cos_sin_ptr,
                              q_out_ptr, k_pool_ptr, v_pool_ptr, slots_ptr,
                              NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                              HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr,
                              KV_LIMIT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, HALF)
    # q's heads go to q_out, k's to the pool (whose dtype may be fp8: pool stores cast to it)
    if h < NUM_Q_HEADS:
        src = q_ptr + t * q_stride + h * HEAD_DIM
        weight = q_weight_ptr
        dst = (t * NUM_Q_HEADS + h) * HEAD_DIM
    else:
        kv_head = h - NUM_Q_HEADS
        slot = tl.load(slots_ptr + t).to(tl.int64)
        src = k_ptr + t * k_stride + kv_head * HEAD_DIM
        weight = k_weight_ptr
        dst = (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM
        full = tl.arange(0, HEAD_DIM)
        v_row = tl.load(v_ptr + t * v_stride + kv_head * HEAD_DIM + full).to(tl.float32)
        if KV_LIMIT > 0:  # an fp8 pool: saturate at its largest finite value
            v_row = tl.minimum(tl.maximum(v_row, -KV_LIMIT), KV_LIMIT)
        tl.store(v_pool_ptr + dst + full, v_row.to(v_pool_ptr.dtype.element_ty))
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + HALF + d).to(tl.float32)
    out_type = q_out_ptr.dtype.element_ty
    if HAS_NORM:
        inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HEAD_DIM + eps)
        x1 = (x1 * inv_rms * tl.load(weight + d).to(tl.float32)).to(out_type).to(tl.float32)
        x2 = (x2 * inv_rms * tl.load(weight + HALF + d).to(tl.float32)).to(out_type).to(tl.float32)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + d)
    sin = tl.load(cos_sin_ptr + pos * HEAD_DIM + HALF + d)
    # rounded to the activation dtype first: a pool in another dtype gets what the separate
    # kernels (rope, then the K/V store) would write
    lo = (x1 * cos - x2 * sin).to(out_type)
    hi = (x2 * cos + x1 * sin).to(out_type)
    if h < NUM_Q_HEADS:
        tl.store(q_out_ptr + dst + d, lo)
        tl.store(q_out_ptr + dst + HALF + d, hi)
    elif KV_LIMIT > 0:  # an fp8 pool: saturate at its largest finite value
        tl.store(k_pool_ptr + dst + d,
                 tl.minimum(tl.maximum(lo.to(tl.float32), -KV_LIMIT), KV_LIMIT).to(k_pool_ptr.dtype.element_ty))
        tl.store(k_pool_ptr + dst + HALF + d,
                 tl.minimum(tl.maximum(hi.to(tl.float32), -KV_LIMIT), KV_LIMIT).to(k_pool_ptr.dtype.element_ty))
    else:
        tl.store(k_pool_ptr + dst + d, lo.to(k_pool_ptr.dtype.element_ty))
        tl.store(k_pool_ptr + dst + HALF + d, hi.to(k_pool_ptr.dtype.element_ty))
