"""The per-step index arrays of a batch, computed on the host with numpy and sent to the device
in ONE copy: no `repeat_interleave`, no per-request `arange`/`cat`, no device->host sync.

Tokens of a batch are laid out request after request; request i owns page-table row `rows[i]`
and contributes the positions [starts[i], ends[i]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class HostBatchIndices:
    rows: np.ndarray  # [B] int64 page-table row of each request
    seq_lens: np.ndarray  # [B] int64 positions after this step (= ends)
    extend_lens: np.ndarray  # [B] int64 new tokens of each request
    positions: np.ndarray  # [T] int64 position of each new token
    token_flat: np.ndarray  # [T] int64 row * table_width + position: the token's cell in the token pool / slot table
    last_token: np.ndarray  # [B] int64 index (in the flattened batch) of each request's last new token
    sampled_flat: np.ndarray  # [B] int64 cell that receives the sampled id (row * width + end), or a dump cell

    @property
    def is_uniform_decode(self) -> bool:
        return self.positions.shape[0] == self.rows.shape[0]

    @classmethod
    def build(cls, rows: Sequence[int], starts: Sequence[int], ends: Sequence[int], table_width: int,
              samples: Sequence[bool] | None = None, dump_cell: int = 0) -> "HostBatchIndices":
        """`samples[i]` false (a chunk before the prompt's last): its sampled id goes to `dump_cell`."""
        rows_a = np.asarray(rows, dtype=np.int64)
        starts_a = np.asarray(starts, dtype=np.int64)
        ends_a = np.asarray(ends, dtype=np.int64)
        ext = ends_a - starts_a
        if ext.shape[0] == 0 or (ext < 1).any():
            raise ValueError(f"every request needs >= 1 new token, got extend lengths {ext.tolist()}")
        last = np.cumsum(ext) - 1
        if last[-1] + 1 == ext.shape[0]:  # one token per request: a decode step
            positions, tok_rows = starts_a, rows_a
        else:
            req_of_token = np.repeat(np.arange(ext.shape[0]), ext)
            first = last + 1 - ext
            positions = np.arange(last[-1] + 1) - first[req_of_token] + starts_a[req_of_token]
            tok_rows = rows_a[req_of_token]
        sampled_flat = rows_a * table_width + ends_a
        if samples is not None and not all(samples):
            sampled_flat = np.where(np.asarray(samples, dtype=bool), sampled_flat, dump_cell)
        return cls(rows_a, ends_a, ext, positions, tok_rows * table_width + positions, last, sampled_flat)

    def pack(self) -> np.ndarray:
        """Everything in one array, for one host->device copy (see `DeviceBatchIndices.unpack`)."""
        return np.concatenate((self.rows, self.seq_lens, self.extend_lens, self.last_token,
                               self.sampled_flat, self.positions, self.token_flat))


@dataclass
class DeviceBatchIndices:
    rows: torch.Tensor
    seq_lens: torch.Tensor
    extend_lens: torch.Tensor
    last_token: torch.Tensor
    sampled_flat: torch.Tensor
    positions: torch.Tensor
    token_flat: torch.Tensor

    @classmethod
    def unpack(cls, packed: torch.Tensor, batch_size: int) -> "DeviceBatchIndices":
        b = batch_size
        t = (packed.shape[0] - 5 * b) // 2
        return cls(*packed.split_with_sizes([b, b, b, b, b, t, t]))
