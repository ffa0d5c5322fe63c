"""TableManager: hands out page-table rows (one per running request) and writes the token pool."""

from __future__ import annotations

import torch

from minisgl_backend.engine.transfer import copy_to
from minisgl_backend.kvcache import PageTable


class TableManager:
    def __init__(self, table: PageTable) -> None:
        self.table = table
        self.num_rows = table.num_rows
        self._free_rows = list(range(self.num_rows - 1, -1, -1))  # the spare row is never here

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def allocate_row(self) -> int:
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def write_tokens(self, row: int, start: int, token_ids: list[int]) -> None:
        pool = self.table.tokens
        copy_to(pool[row, start:start + len(token_ids)], torch.tensor(token_ids, dtype=pool.dtype))
