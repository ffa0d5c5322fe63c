"""The CPU's compiled paged attention (`cpu/csrc/paged_attention.c`, built by `minisgl_backend.cpu`;
`minisgl_backend.kernels` loads it where it is chosen).

Decode rows and short extends read their keys and values straight from the paged pool: no gather
of every row's pages into a padded copy and no mask, which on the CPU cost more than the attention
itself.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

_P, _I = ctypes.c_void_p, ctypes.c_int64
_ATTENTION_ARGS = [_P, _I, _I, _P, _P, _P, _I, _P, _P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_float, _P]
_STORE_ARGS = [_P, _I, _P, _I, _I, _I, _P, _P, _P]


@dataclass(frozen=True)
class PagedAttentionKernel:
    """Causal attention of each row's new tokens over its keys in the pool, and the K/V store."""

    fn: ctypes._CFuncPtr
    store_fn: ctypes._CFuncPtr

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                 rows: torch.Tensor, seq_lens: torch.Tensor, q_starts: torch.Tensor, extend_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """q [T, Hq, D] (tokens and heads may be strided): row b's `extend_lens[b]` new tokens from
        `q_starts[b]` on, the last at position `seq_lens[b] - 1`; pools [slots, Hkv, D] float32,
        table [R, W] int32 slot ids, rows / seq_lens / q_starts / extend_lens [B] int64 -> [T, Hq, D]."""
        tokens, num_heads, head_dim = q.shape
        assert q.dtype == k_pool.dtype == v_pool.dtype == torch.float32 and q.stride(2) == 1
        assert k_pool.is_contiguous() and v_pool.is_contiguous() and table.stride(1) == 1
        assert table.dtype == torch.int32
        held = [t.contiguous() for t in (rows, seq_lens, q_starts, extend_lens)]  # alive until the call returns
        assert all(t.dtype == torch.int64 for t in held)
        out = torch.empty(tokens, num_heads, head_dim, dtype=torch.float32)
        failed = self.fn(q.data_ptr(), q.stride(0), q.stride(1), k_pool.data_ptr(), v_pool.data_ptr(),
                         table.data_ptr(), table.stride(0), *(t.data_ptr() for t in held),
                         rows.shape[0], tokens, num_heads, k_pool.shape[1], head_dim, scale, out.data_ptr())
        if failed:
            raise MemoryError("paged attention: no memory for its score buffers")
        return out

    def store(self, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> bool:
        """k / v [T, Hkv, D] into `slots` [T] int64 of the pools, or False (nothing written) for a
        layout the kernel does not take."""
        heads, dim = k.shape[1], k.shape[2]
        if (k.dtype != torch.float32 or v.dtype != torch.float32 or k_pool.dtype != torch.float32
                or v_pool.dtype != torch.float32 or k.stride(1) != dim or v.stride(1) != dim
                or k.stride(2) != 1 or v.stride(2) != 1 or slots.dtype != torch.int64):
            return False
        slots = slots.contiguous()
        self.store_fn(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k.shape[0], heads * dim,
                      slots.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr())
        return True


def kernel_of(library: ctypes.CDLL) -> PagedAttentionKernel:
    """The kernel's two functions in the compiled CPU library."""
    fn, store = library.paged_attention_f32, library.store_kv_f32
    fn.argtypes, fn.restype = _ATTENTION_ARGS, ctypes.c_int
    store.argtypes, store.restype = _STORE_ARGS, None
    return PagedAttentionKernel(fn, store)
