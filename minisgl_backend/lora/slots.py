"""The adapters resident on the device: `max_loras` slots of stacked A / B buffers per decoder
layer and module, and which adapter sits in which slot (loaded on first use, evicted least
recently used among the slots no running request needs)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from minisgl_backend.lora.adapter import MODULES, LoraAdapter


@dataclass
class ModuleShape:
    inputs: int  # per rank
    outputs: int  # per rank


@dataclass
class LoraSlots:
    """A [S, R, in] and B [S, out, R] per (layer, module), zero where an adapter has no such
    module or a smaller rank (a zero row or column adds nothing)."""

    a: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    b: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def allocate(cls, shapes: dict[str, ModuleShape], num_layers: int, max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device | str) -> "LoraSlots":
        slots = cls()
        for layer in range(num_layers):
            for module in MODULES:
                shape = shapes[module]
                slots.a[(layer, module)] = torch.zeros(max_loras, max_rank, shape.inputs, dtype=dtype, device=device)
                slots.b[(layer, module)] = torch.zeros(max_loras, shape.outputs, max_rank, dtype=dtype, device=device)
        return slots

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        self.clear(slot)
        for key, (a, b) in adapter.weights.items():
            rank = a.shape[0]
            self.a[key][slot, :rank].copy_(a)
            self.b[key][slot, :, :rank].copy_(b)

    def clear(self, slot: int) -> None:
        for buffers in (self.a, self.b):
            for tensor in buffers.values():
                tensor[slot].zero_()


class SlotTable:
    """Which adapter is in which slot. `slot_for` loads an adapter on first use into a free slot or
    the least recently used one that `busy` does not protect; None when every slot is busy (the
    request waits)."""

    def __init__(self, max_loras: int, load: Callable[[int, str], None]) -> None:
        self.max_loras = max_loras
        self._load = load
        self._slots: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.loads = 0
        self.evictions = 0

    def slot_for(self, name: str, busy: Callable[[str], bool]) -> int | None:
        slot = self._slots.get(name)
        if slot is not None:
            self._slots.move_to_end(name)
            return slot
        free = sorted(set(range(self.max_loras)) - set(self._slots.values()))
        if free:
            slot = free[0]
        else:
            victim = next((n for n in self._slots if not busy(n)), None)
            if victim is None:
                return None
            slot = self._slots.pop(victim)
            self.evictions += 1
        self._load(slot, name)
        self._slots[name] = slot
        self.loads += 1
        return slot

    def resident(self) -> dict[str, int]:
        return dict(self._slots)

    def drop(self, name: str) -> int | None:
        """Forget an adapter (unloaded at run time); its slot is free again."""
        return self._slots.pop(name, None)
