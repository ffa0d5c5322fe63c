"""Reference attention on plain torch: gathers each request's K/V through the page table.

The CPU path and the correctness reference for the flashinfer backend. Requests are padded to
the longest one of their group and masked: decode rows (1 new token) form one group and the
rows with longer extends another, so a mixed batch does not pad every decode row to the longest
prefill chunk. A batch costs one SDPA call per group per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minisgl_backend.attention.base import BatchLayout
from minisgl_backend.kvcache import KVCache


@dataclass
class _Group:
    kv_index: torch.Tensor  # [B, L] KV slot of each key position (0 where masked)
    mask: torch.Tensor  # [B, 1, E, L]
    q_valid: torch.Tensor  # [B, E] which padded query slots hold a token
    token_index: torch.Tensor  # [T_g] the group's tokens in the batch's flat token order
    shape: tuple[int, int]


class TorchAttentionBackend:
    def __init__(self, kv_cache: KVCache, page_table: torch.Tensor) -> None:
        self.kv_cache = kv_cache
        self.page_table = page_table
        self._layout: BatchLayout | None = None
        self._groups: list[_Group] = []

    def prepare(self, layout: BatchLayout) -> None:
        ext = layout.extend_lens_cpu
        decode = [i for i, n in enumerate(ext) if n == 1]
        other = [i for i, n in enumerate(ext) if n != 1]
        self._groups = [self._plan(layout, rows) for rows in (decode, other) if rows]
        self._layout = layout

    def _plan(self, layout: BatchLayout, members: list[int]) -> _Group:
        device = self.page_table.device
        idx = torch.tensor(members, dtype=torch.int64, device=device)
        seq_lens, ext_lens = layout.seq_lens[idx], layout.extend_lens[idx]
        max_len = max(layout.seq_lens_cpu[i] for i in members)
        max_ext = max(layout.extend_lens_cpu[i] for i in members)
        key_pos = torch.arange(max_len, device=device)
        key_valid = key_pos[None, :] < seq_lens[:, None]
        kv_index = torch.where(key_valid, self.page_table[layout.rows[idx], :max_len], 0).long()
        q_off = torch.arange(max_ext, device=device)
        q_valid = q_off[None, :] < ext_lens[:, None]
        q_pos = (seq_lens - ext_lens)[:, None] + q_off[None, :]
        allowed = (key_pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]
        starts = (torch.cumsum(layout.extend_lens, 0) - layout.extend_lens)[idx]
        token_index = (starts[:, None] + q_off[None, :])[q_valid]
        return _Group(kv_index, allowed[:, None, :, :], q_valid, token_index, (len(members), max_ext))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        assert self._layout is not None, "prepare() must run before forward()"
        self.kv_cache.store(layer_id, self._layout.out_loc, k, v)
        num_tokens, num_heads, head_dim = q.shape
        out = q.new_empty(num_tokens, num_heads, head_dim)
        for g in self._groups:
            out[g.token_index] = self._attend(g, q[g.token_index], layer_id, k.shape[1])
        return out.reshape(num_tokens, num_heads * head_dim)

    def _attend(self, g: _Group, q: torch.Tensor, layer_id: int, num_kv_heads: int) -> torch.Tensor:
        num_heads, head_dim = q.shape[1], q.shape[2]
        if g.shape[1] == 1:  # decode rows: one query each, nothing to pad
            q_pad = q.unsqueeze(1)
        else:
            q_pad = q.new_zeros(*g.shape, num_heads, head_dim)
            q_pad[g.q_valid] = q
        keys = self.kv_cache.k[layer_id][g.kv_index].to(q.dtype)
        values = self.kv_cache.v[layer_id][g.kv_index].to(q.dtype)
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=g.mask, enable_gqa=num_heads != num_kv_heads,
        )
        return out.transpose(1, 2)[g.q_valid]
