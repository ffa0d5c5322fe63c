"""The CPU decode-attention kernel (`cpu/csrc/paged_decode.c`, built by `minisgl_backend.cpu`).

Decode rows read their keys and values straight from the paged pool: no gather of every row's
pages into a padded copy and no mask, which on the CPU cost more than the attention itself
(at 256 streams of a micro model the gather was 33 % and SDPA 26 % of the scheduler's time).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from minisgl_backend.cpu import cpu_library

_ARGTYPES = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
              ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
             + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int64, ctypes.c_void_p])


@dataclass(frozen=True)
class PagedDecodeKernel:
    """`out[b, h] = softmax(scale * q[b, h] . K[rows[b], :seq_lens[b]]) @ V[...]` over the pool."""

    fn: ctypes._CFuncPtr
    store_fn: ctypes._CFuncPtr

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                 rows: torch.Tensor, seq_lens: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
        """q [B, Hq, D] (rows and heads may be strided), pools [slots, Hkv, D] float32, table [R, W]
        int32 slot ids, rows / seq_lens [B] int64 -> [B, Hq, D]."""
        batch, num_heads, head_dim = q.shape
        assert q.dtype == k_pool.dtype == v_pool.dtype == torch.float32 and q.stride(2) == 1
        assert k_pool.is_contiguous() and v_pool.is_contiguous() and table.stride(1) == 1
        assert table.dtype == torch.int32 and rows.dtype == seq_lens.dtype == torch.int64
        rows, seq_lens = rows.contiguous(), seq_lens.contiguous()  # held until the call returns
        out = torch.empty(batch, num_heads, head_dim, dtype=torch.float32)
        failed = self.fn(q.data_ptr(), q.stride(0), q.stride(1), k_pool.data_ptr(), v_pool.data_ptr(),
                         table.data_ptr(), table.stride(0), rows.data_ptr(), seq_lens.data_ptr(),
                         batch, num_heads, k_pool.shape[1], head_dim, scale, max_len, out.data_ptr())
        if failed:
            raise MemoryError("paged decode attention: no memory for its score buffers")
        return out

    def store(self, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> bool:
        """k / v [T, Hkv, D] into `slots` [T] int64 of the pools, or False (nothing written) for a
        layout the kernel does not take."""
        heads, dim = k.shape[1], k.shape[2]
        if (k.dtype != torch.float32 or v.dtype != torch.float32 or k.stride(1) != dim or v.stride(1) != dim
                or k.stride(2) != 1 or v.stride(2) != 1 or slots.dtype != torch.int64):
            return False
        slots = slots.contiguous()
        self.store_fn(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k.shape[0], heads * dim,
                      slots.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr())
        return True


def paged_decode_kernel() -> PagedDecodeKernel | None:
    """The compiled kernel, or None where the CPU library cannot be built here (warned once)."""
    library = cpu_library()
    return None if library is None else kernel_of(library)


def kernel_of(library: ctypes.CDLL) -> PagedDecodeKernel:
    fn = library.paged_decode_attention_f32
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    store = library.store_kv_f32
    store.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    store.restype = None
    return PagedDecodeKernel(fn, store)
