"""Token bitmasks: built per batch on the scheduler side, applied to the logits by the engine.

A bitmask is int32 [B, ceil(V / 32)]; bit j of word w in row b allows token 32 * w + j (the
xgrammar layout). Rows without a constraint are all ones, which leaves their logits exactly as
they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from minisgl_backend.grammar.matcher import GrammarState


@dataclass
class GrammarMask:
    bitmask: torch.Tensor  # [B, ceil(V / 32)] int32, host memory
    num_constrained: int


def build_mask(states: Sequence[GrammarState | None], vocab_size: int,
               drafts: Sequence[Sequence[int]] | None = None) -> GrammarMask | None:
    """The mask of one batch (`states[i]`: the grammar of item i, None for a free item). With
    `drafts`, item i has `len(drafts[i]) + 1` rows (a verify item): the state after each draft."""
    drafts = drafts if drafts is not None else [()] * len(states)
    constrained = [i for i, s in enumerate(states) if s is not None]
    if not constrained:
        return None
    first_rows = [0]
    for d in drafts:
        first_rows.append(first_rows[-1] + len(d) + 1)
    bitmask = torch.full((first_rows[-1], (vocab_size + 31) // 32), -1, dtype=torch.int32)
    for i in constrained:
        if drafts[i]:
            states[i].fill_masks(bitmask, first_rows[i], drafts[i])
        else:
            states[i].fill_mask(bitmask, first_rows[i])
    return GrammarMask(bitmask, len(constrained))


def apply_mask(logits: torch.Tensor, mask: GrammarMask) -> torch.Tensor:
    """Set forbidden tokens to -inf, in place: xgrammar's CPU kernel, or its plain-torch one on
    other devices (its default CUDA kernel needs triton, which this project does not install)."""
    import xgrammar

    bitmask = mask.bitmask.to(logits.device, non_blocking=True)
    vocab = min(logits.shape[-1], bitmask.shape[-1] * 32)
    backend = "cpu" if logits.device.type == "cpu" else "torch_native"
    xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, backend=backend)
    return logits
