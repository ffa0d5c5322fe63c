"""The paged KV pool: one K and one V buffer per layer, addressed by slot (page * page_size + offset)."""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # `kv_cache_dtype` fp8 / fp8_e5m2


def to_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x cast to an fp8 dtype, saturating at its largest finite value as the Triton kernels'
    conversions do (torch < 2.12 turns an e4m3 value past the range into NaN, e5m2 into inf)."""
    limit = torch.finfo(dtype).max
    return x.clamp(-limit, limit).to(dtype)


class KVCache:
    """`num_pages` pages for requests plus one spare page past them, which no request ever gets:
    the K/V of CUDA-graph padding (dummy requests) is written there."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (2, (num_pages + 1) * page_size, num_kv_heads, head_dim)
        # K and V of a layer share one buffer ([0] = K, [1] = V, each contiguous), so a K/V pair
        # that sits side by side in the qkv output is stored with one indexed write
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k = [kv[0] for kv in self.kv]
        self.v = [kv[1] for kv in self.kv]

    @property
    def spare_slot(self) -> int:
        """The first slot of the spare page."""
        return self.num_pages * self.page_size

    def store(self, layer_id: int, out_loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k / v [T, Hkv, D] into slots `out_loc` [T] (one write when v's heads follow k's in memory)."""
        kv = self.kv[layer_id]
        pair = _kv_pair(k, v) if k.dtype == kv.dtype else None
        if pair is not None:
            kv[:, out_loc] = pair
            return
        k_pool, v_pool = self.k[layer_id], self.v[layer_id]
        if kv.dtype in FP8_DTYPES:  # cast, then an indexed write of bytes (every device indexes uint8)
            k_pool.view(torch.uint8)[out_loc] = to_fp8(k, kv.dtype).view(torch.uint8)
            v_pool.view(torch.uint8)[out_loc] = to_fp8(v, kv.dtype).view(torch.uint8)
            return
        k_pool[out_loc] = k.to(kv.dtype)
        v_pool[out_loc] = v.to(kv.dtype)

    def free(self) -> None:
        """Drop the buffers (engine shutdown); the cache cannot be used afterwards."""
        self.kv, self.k, self.v = [], [], []

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _kv_pair(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """A [2, T, Hkv, D] view over k and v when v's heads directly follow k's (same row stride)."""
    heads, dim = k.shape[1], k.shape[2]
    if (k.dim() != 3 or k.shape != v.shape or k.stride() != v.stride() or k.stride(1) != dim
            or k.stride(2) != 1 or v.dtype != k.dtype
            or v.data_ptr() != k.data_ptr() + heads * dim * k.element_size()):
        return None
    return k.as_strided((2, k.shape[0], heads, dim), (heads * dim, k.stride(0), dim, 1))
