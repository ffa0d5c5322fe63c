"""The LoRA delta of a batch whose rows belong to different adapters (and to the base model).

`LoraBatch` carries each token's slot (-1: the base model) on the device, and on the host the
tokens of each slot. On the CPU the delta is computed per adapter with two small matmuls over its
tokens (a slice when they are consecutive, else gathered and scattered back); on CUDA by two Triton kernels that read each token's slot on the device (no host
loop, so a CUDA graph replays them for any mix of adapters): shrink h = x A_s^T, expand
y += h B_s^T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from minisgl_backend.lora.slots import LoraSlots


@dataclass
class LoraBatch:
    slots: LoraSlots
    token_slots: torch.Tensor | None  # [T] int64 on the device (for the kernels)
    runs: list[tuple[int, int, int]]  # (first token, end, slot) of the tokens with an adapter
    use_kernel: bool = False
    _groups: list[tuple[int, slice | torch.Tensor]] | None = None

    def groups(self) -> list[tuple[int, slice | torch.Tensor]]:
        """(slot, its tokens) per adapter in the batch: a slice, or the token indices."""
        if self._groups is None:
            by_slot: dict[int, list[tuple[int, int]]] = {}
            for start, end, slot in self.runs:
                by_slot.setdefault(slot, []).append((start, end))
            self._groups = [(slot, slice(*runs[0]) if len(runs) == 1 else
                             torch.cat([torch.arange(s, e) for s, e in runs]))
                            for slot, runs in by_slot.items()]
        return self._groups

    def partial(self, x: torch.Tensor, layer: int, module: str) -> Callable[[torch.Tensor], None]:
        """`add` for a row-parallel module: applied to its partial sum before the all-reduce."""
        return lambda y: self.add(y, x, layer, module)

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str, offset: int = 0) -> None:
        """y[:, offset:offset + out] += delta of `module` for each token's adapter."""
        a, b = self.slots.a[(layer, module)], self.slots.b[(layer, module)]
        if self.use_kernel:
            from minisgl_backend.lora.kernel import lora_shrink_expand

            lora_shrink_expand(x, a, b, self.token_slots, y, offset)
            return
        target = y[:, offset:offset + b.shape[1]]
        for slot, tokens in self.groups():
            delta = (x[tokens] @ a[slot].transpose(0, 1)) @ b[slot].transpose(0, 1)
            if isinstance(tokens, slice):
                target[tokens] += delta.to(y.dtype)
            else:
                target.index_add_(0, tokens, delta.to(y.dtype))


def token_runs(slots_per_request: list[int], tokens_per_request: list[int]) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Each token's slot, and the runs of consecutive tokens of one adapter (base runs left out)."""
    token_slots: list[int] = []
    runs: list[tuple[int, int, int]] = []
    for slot, count in zip(slots_per_request, tokens_per_request):
        start = len(token_slots)
        token_slots.extend([slot] * count)
        if slot < 0:
            continue
        if runs and runs[-1][2] == slot and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], start + count, slot)
        else:
            runs.append((start, start + count, slot))
    return token_slots, runs
