"""Token bitmasks: built per batch on the scheduler side, applied to the logits by the engine.

A bitmask is int32 [B, ceil(V / 32)]; bit j of word w in row b allows token 32 * w + j (the
xgrammar layout). `GrammarMask` carries only the rows that have a constraint, so every other
row of the batch is left exactly as it was.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from minisgl_backend.grammar.matcher import GrammarState


@dataclass
class GrammarMask:
    rows: torch.Tensor  # [R] int64: the batch rows with a constraint
    bitmask: torch.Tensor  # [R, ceil(V / 32)] int32: their allowed tokens


def build_mask(states: Sequence[GrammarState | None], vocab_size: int) -> GrammarMask | None:
    """The mask of one batch (`states[i]`: the grammar of row i, None for a free row)."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return None
    bitmask = torch.empty((len(rows), (vocab_size + 31) // 32), dtype=torch.int32)
    for k, i in enumerate(rows):
        states[i].fill_mask(bitmask, k)
    return GrammarMask(torch.tensor(rows, dtype=torch.int64), bitmask)


@functools.lru_cache(maxsize=8)
def _bits(device: torch.device) -> torch.Tensor:
    """[32] int32 with only bit j set in element j (bit 31 is the sign bit)."""
    return torch.tensor([1 << j if j < 31 else -(1 << 31) for j in range(32)], dtype=torch.int32, device=device)


def apply_mask(logits: torch.Tensor, mask: GrammarMask) -> torch.Tensor:
    """Set the forbidden tokens of the constrained rows to -inf, in place (any device)."""
    rows = mask.rows.to(logits.device, non_blocking=True)
    words = mask.bitmask.to(logits.device, non_blocking=True)
    vocab = logits.shape[-1]
    allowed = (words.unsqueeze(-1) & _bits(logits.device)).ne(0).flatten(1)[:, :vocab]
    sub = logits.index_select(0, rows)
    sub.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, sub)
    return logits
