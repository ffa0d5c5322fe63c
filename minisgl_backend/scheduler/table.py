"""Page-table rows and the token pool: one row per running request."""

from __future__ import annotations

import torch

from minisgl_backend.engine.transfer import copy_to


class TableManager:
    def __init__(self, page_table: torch.Tensor, token_pool: torch.Tensor, num_rows: int) -> None:
        self.page_table = page_table  # [rows + 1, max_len] int32 slot per position; the last row is spare
        self.token_pool = token_pool  # [rows + 1, max_len] int64 token id per position
        self.num_rows = num_rows
        self._free_rows = list(range(num_rows - 1, -1, -1))

    @property
    def spare_row(self) -> int:
        """A row that no request owns: pads CUDA-graph batches without touching real requests."""
        return self.num_rows

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def allocate_row(self) -> int:
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def write_tokens(self, row: int, start: int, token_ids: list[int]) -> None:
        ids = torch.tensor(token_ids, dtype=self.token_pool.dtype)
        copy_to(self.token_pool[row, start:start + len(token_ids)], ids)
