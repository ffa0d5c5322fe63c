"""Reference attention on plain torch: gathers each request's K/V through the page table.

The CPU path and the correctness reference for the flashinfer backend. Requests are padded to
the longest one in the batch and masked, so a batch costs one SDPA call per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minisgl_backend.attention.base import BatchLayout
from minisgl_backend.kvcache import KVCache


class TorchAttentionBackend:
    def __init__(self, kv_cache: KVCache, page_table: torch.Tensor) -> None:
        self.kv_cache = kv_cache
        self.page_table = page_table
        self._layout: BatchLayout | None = None

    def prepare(self, layout: BatchLayout) -> None:
        device = self.page_table.device
        bsz = len(layout.seq_lens_cpu)
        max_len, max_ext = max(layout.seq_lens_cpu), max(layout.extend_lens_cpu)
        seq_lens, ext_lens = layout.seq_lens, layout.extend_lens
        key_pos = torch.arange(max_len, device=device)
        key_valid = key_pos[None, :] < seq_lens[:, None]  # [B, L]
        self.kv_index = torch.where(key_valid, self.page_table[layout.rows, :max_len], 0).long()
        self._layout = layout
        self.decode = max_ext == 1  # one query per request: no padding of q, the mask is key_valid
        if self.decode:
            self.mask = key_valid[:, None, None, :]  # [B, 1, 1, L]
            return
        q_off = torch.arange(max_ext, device=device)
        q_valid = q_off[None, :] < ext_lens[:, None]  # [B, E]
        q_pos = (seq_lens - ext_lens)[:, None] + q_off[None, :]
        allowed = (key_pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]
        self.mask = allowed[:, None, :, :]  # [B, 1, E, L]
        starts = torch.cumsum(ext_lens, 0) - ext_lens
        self.q_flat_index = (starts[:, None] + q_off[None, :])[q_valid]  # token -> padded slot
        self.q_valid = q_valid
        self.shape = (bsz, max_ext)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        assert self._layout is not None, "prepare() must run before forward()"
        self.kv_cache.store(layer_id, self._layout.out_loc, k, v)
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        if self.decode:
            q_pad = q.unsqueeze(1)  # [B, 1, H, D]
        else:
            q_pad = q.new_zeros(*self.shape, num_heads, head_dim)
            q_pad[self.q_valid] = q
        keys = self.kv_cache.k[layer_id][self.kv_index].to(q.dtype)  # [B, L, Hkv, D]
        values = self.kv_cache.v[layer_id][self.kv_index].to(q.dtype)
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=self.mask, enable_gqa=num_heads != num_kv_heads,
        )  # [B, H, E, D]
        out = out.transpose(1, 2)
        if not self.decode:
            out = out[self.q_valid]
        return out.reshape(num_tokens, num_heads * head_dim)
