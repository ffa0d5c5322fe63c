"""The paged KV pool: one K and one V buffer per layer, addressed by slot (page * page_size + offset)."""

from __future__ import annotations

import torch


class KVCache:
    """`num_pages` pages for requests plus one spare page past them, which no request ever gets:
    the K/V of CUDA-graph padding (dummy requests) is written there."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        shape = ((num_pages + 1) * page_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def spare_slot(self) -> int:
        """The first slot of the spare page."""
        return self.num_pages * self.page_size

    def store(self, layer_id: int, out_loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer_id][out_loc] = k.to(self.k[layer_id].dtype)
        self.v[layer_id][out_loc] = v.to(self.v[layer_id].dtype)

    def free(self) -> None:
        """Drop the buffers (engine shutdown); the cache cannot be used afterwards."""
        self.k, self.v = [], []

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
