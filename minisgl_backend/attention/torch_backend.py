"""Reference attention on plain torch: gathers each request's K/V through the page table.

K/V are gathered a page at a time (`index_select` over whole pages is cheaper than indexing
token by token); positions past a request's length are masked.

The CPU path and the correctness reference for the flashinfer backend. Requests are padded to
the longest one of their group and masked: decode rows (1 new token) form one group, and the
rows with longer extends are grouped by key length (no row padded past twice its own), so a
mixed batch does not pad every decode row to the longest prefill chunk, nor a short prompt to
the longest one. A batch costs one SDPA call per group per layer.

With a `kernel` (the CPU's compiled paged attention, `cpu_kernels.py`), decode rows and extends
of up to KERNEL_MAX_EXTEND tokens skip the gather, the padding and the mask: the kernel reads
each row's keys and values in the pool through its page-table row, and skips the keys past each
query's position. Longer extends go to SDPA.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from minisgl_backend.attention.base import BatchLayout
from minisgl_backend.attention.cpu_kernels import PagedAttentionKernel
from minisgl_backend.kvcache import KVCache
from minisgl_backend.kvcache.pool import FP8_DTYPES


@dataclass
class _Group:
    page_ids: torch.Tensor  # [B * P] the pages holding each row's keys, row after row
    mask: torch.Tensor  # [B, 1, E, P * page_size] additive: 0 where a query may attend, -inf elsewhere
    q_valid: torch.Tensor | None  # [B, E] which padded query slots hold a token (None: decode rows)
    token_index: torch.Tensor  # [T_g] the group's tokens in the batch's flat token order
    shape: tuple[int, int]


@dataclass
class _KernelGroup:
    """Rows for the paged attention kernel: no gathered pages, no mask."""

    rows: torch.Tensor  # [B] int64 page-table rows
    seq_lens: torch.Tensor  # [B] int64
    q_starts: torch.Tensor  # [B] int64 each row's first token among the group's tokens
    extend_lens: torch.Tensor  # [B] int64
    token_index: torch.Tensor | None  # [T_g] the group's tokens in the batch's flat token order (None: all)


# Extends longer than this go to SDPA: the kernel was faster at every length tried, so only very
# long chunks keep SDPA's blocked GEMMs.
KERNEL_MAX_EXTEND = 2048


class TorchAttentionBackend:
    def __init__(self, kv_cache: KVCache, page_table: torch.Tensor,
                 kernel: PagedAttentionKernel | None = None) -> None:
        self.kv_cache = kv_cache
        self.page_table = page_table
        self.kernel = kernel
        self._layout: BatchLayout | None = None
        self._groups: list[_Group | _KernelGroup] = []

    def prepare(self, layout: BatchLayout) -> None:
        ext = layout.extend_lens_cpu
        starts = list(itertools.accumulate(ext, initial=0))
        if self.kernel is not None:
            mine = [i for i, n in enumerate(ext) if n <= KERNEL_MAX_EXTEND]
            other = [i for i, n in enumerate(ext) if n > KERNEL_MAX_EXTEND]
            groups = [self._kernel_group(layout, mine, starts)] if mine else []
            groups += [self._plan(layout, rows, starts) for rows in _by_key_length(layout.seq_lens_cpu, other)]
            self._groups, self._layout = groups, layout
            return
        decode = [i for i, n in enumerate(ext) if n == 1]
        other = [i for i, n in enumerate(ext) if n != 1]
        # decode rows stay one group: split by length they measured no faster (the saved padding
        # costs as much as the extra gather / SDPA / scatter ops of another group)
        groups = [decode, *_by_key_length(layout.seq_lens_cpu, other)]
        self._groups = [self._plan(layout, rows, starts) for rows in groups if rows]
        self._layout = layout

    def _kernel_group(self, layout: BatchLayout, members: list[int], starts: list[int]) -> _KernelGroup:
        ext = layout.extend_lens_cpu
        device = self.page_table.device
        q_starts = torch.tensor(list(itertools.accumulate((ext[i] for i in members), initial=0))[:-1],
                                dtype=torch.int64, device=device)
        if len(members) == len(ext):  # the whole batch: its tokens in order, no row gather
            return _KernelGroup(layout.rows, layout.seq_lens, q_starts, layout.extend_lens, None)
        idx = torch.tensor(members, dtype=torch.int64, device=device)
        tokens = np.concatenate([np.arange(starts[i], starts[i] + ext[i]) for i in members])
        return _KernelGroup(layout.rows[idx], layout.seq_lens[idx], q_starts, layout.extend_lens[idx],
                            torch.from_numpy(tokens).to(device))

    def _plan(self, layout: BatchLayout, members: list[int], starts: list[int]) -> _Group:
        device = self.page_table.device
        whole = len(members) == len(layout.extend_lens_cpu)  # the group is the batch: no row gather
        idx = None if whole else torch.tensor(members, dtype=torch.int64, device=device)
        pick = (lambda t: t) if idx is None else (lambda t: t[idx])  # noqa: E731
        seq_lens, rows = pick(layout.seq_lens), pick(layout.rows)
        page_size = self.kv_cache.page_size
        max_len = max(layout.seq_lens_cpu[i] for i in members)
        max_ext = max(layout.extend_lens_cpu[i] for i in members)
        first = torch.tensor([starts[i] for i in members], dtype=torch.int64, device=device)
        num_pages = -(-max_len // page_size)
        # pages past a row's length hold stale (in-range) ids: gathered, then masked out
        page_ids = (self.page_table[rows, :num_pages * page_size:page_size] // page_size).flatten()
        key_pos = torch.arange(num_pages * page_size, device=device)
        key_valid = key_pos[None, :] < seq_lens[:, None]
        if max_ext == 1:  # decode rows: one query each, at the last position
            return _Group(page_ids, self._additive(key_valid[:, None, None, :]), None, first, (len(members), 1))
        ext_lens = pick(layout.extend_lens)
        q_off = torch.arange(max_ext, device=device)
        q_valid = q_off[None, :] < ext_lens[:, None]
        q_pos = (seq_lens - ext_lens)[:, None] + q_off[None, :]
        allowed = (key_pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]
        token_index = (first[:, None] + q_off[None, :])[q_valid]
        return _Group(page_ids, self._additive(allowed[:, None, :, :]), q_valid, token_index, (len(members), max_ext))

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean mask in SDPA's float form, built once per batch: SDPA would convert a boolean
        mask in every layer's call (same values, so the outputs are bit-equal)."""
        pool_dtype = self.kv_cache.k[0].dtype
        mask = torch.zeros(allowed.shape, dtype=torch.float32 if pool_dtype in FP8_DTYPES else pool_dtype,
                           device=allowed.device)  # fp8 e4m3 has no -inf
        return mask.masked_fill_(~allowed, float("-inf"))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        assert self._layout is not None, "prepare() must run before forward()"
        self._store(layer_id, k, v)
        return self.attend(q, layer_id)

    def kv_target(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self._layout is not None, "prepare() must run before kv_target()"
        return self.kv_cache.k[layer_id], self.kv_cache.v[layer_id], self._layout.out_loc

    def attend(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = self.kv_cache.k[layer_id].shape[1]
        if len(self._groups) == 1:  # one group holds every token, in batch order
            return self._attend(self._groups[0], q, layer_id, num_kv_heads).reshape(num_tokens, num_heads * head_dim)
        out = q.new_empty(num_tokens, num_heads, head_dim)
        for g in self._groups:
            out[g.token_index] = self._attend(g, q[g.token_index], layer_id, num_kv_heads)
        return out.reshape(num_tokens, num_heads * head_dim)

    def _store(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        pools = self.kv_cache.k[layer_id], self.kv_cache.v[layer_id]
        if self.kernel is None or not self.kernel.store(*pools, self._layout.out_loc, k, v):
            self.kv_cache.store(layer_id, self._layout.out_loc, k, v)

    def _attend(self, g: _Group | _KernelGroup, q: torch.Tensor, layer_id: int, num_kv_heads: int) -> torch.Tensor:
        num_heads, head_dim = q.shape[1], q.shape[2]
        if isinstance(g, _KernelGroup):
            return self.kernel(q, self.kv_cache.k[layer_id], self.kv_cache.v[layer_id], self.page_table,
                               g.rows, g.seq_lens, g.q_starts, g.extend_lens, head_dim ** -0.5)
        decode = g.shape[1] == 1  # one query per row: nothing to pad
        if decode:
            q_pad = q.unsqueeze(1)
        else:
            q_pad = q.new_zeros(*g.shape, num_heads, head_dim)
            q_pad[g.q_valid] = q
        keys = self._gather(self.kv_cache.k[layer_id], g).to(q.dtype)
        values = self._gather(self.kv_cache.v[layer_id], g).to(q.dtype)
        if g.mask.dtype != q.dtype:  # an fp8 pool's float32 mask: converted once, for every layer
            g.mask = g.mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=g.mask, enable_gqa=num_heads != num_kv_heads,
        ).transpose(1, 2)
        return out.reshape(q.shape) if decode else out[g.q_valid]

    def _gather(self, pool: torch.Tensor, g: _Group) -> torch.Tensor:
        """[slots, Hkv, D] -> [B, P * page_size, Hkv, D]: the group's pages, row after row."""
        slots, heads, dim = pool.shape
        raw = pool.view(torch.uint8) if pool.dtype in FP8_DTYPES else pool  # fp8: gathered as bytes
        pages = raw.view(slots // self.kv_cache.page_size, -1).index_select(0, g.page_ids)
        return pages.view(pool.dtype).view(g.shape[0], -1, heads, dim)


def _by_key_length(seq_lens: list[int], members: list[int]) -> list[list[int]]:
    """Rows with longer extends, grouped so that no row is padded past twice its key length:
    a group's rows are padded to its longest, and a 16-token prompt padded to 128 costs 64x its
    own attention."""
    groups: list[list[int]] = []
    for i in sorted(members, key=lambda i: -seq_lens[i]):
        if groups and 2 * seq_lens[i] >= seq_lens[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
