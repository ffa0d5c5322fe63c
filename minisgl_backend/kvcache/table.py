"""The page table and the token pool: one row per running request, plus a spare row."""

from __future__ import annotations

import torch


class PageTable:
    """`slots[row, pos]`: the KV slot of position `pos` of the request on `row`;
    `tokens[row, pos]`: its token id (sampled ids land here on the device).

    Rows [0, num_rows) are handed to requests; the spare row is never handed out: it pads
    CUDA-graph batches, its one position mapped to the KV cache's spare slot.
    """

    def __init__(self, num_rows: int, max_seq_len: int, page_size: int, spare_slot: int,
                 device: torch.device | str) -> None:
        width = -(-(max_seq_len + 1) // page_size) * page_size
        self.num_rows = num_rows
        self.slots = torch.zeros(num_rows + 1, width, dtype=torch.int32, device=device)
        self.tokens = torch.zeros(num_rows + 1, width, dtype=torch.int64, device=device)
        self.slots[self.spare_row, 0] = spare_slot
        self.spare_slot = spare_slot

    @property
    def spare_row(self) -> int:
        return self.num_rows

    @property
    def width(self) -> int:
        return self.slots.shape[1]

    @property
    def dump_cell(self) -> int:
        """The spare row's last cell (flat index): ids sampled where nothing reads them land here."""
        return self.spare_row * self.width + self.width - 1
