"""Host index arrays -> device tensors through persistent pinned buffers (the per-step metadata
that addresses the KV pool and the page table: one copy per array, no allocation, no sync)."""

from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    """Host arrays -> device tensors through a ring of persistent pinned buffers, one copy each.

    `to_device(t).pin_memory()` allocates pinned memory on every call; here each step's small
    index arrays are written into a pinned slot that is reused once the copy that last read it
    has run (an event per slot; with `slots` >= the batches in flight it never waits in practice).
    On the CPU the array is wrapped without a copy.
    """

    def __init__(self, device: torch.device | str, slots: int = 16, capacity: int = 1 << 14) -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._bufs: list[torch.Tensor | None] = [None] * slots
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._capacity = capacity
        self._next = 0

    def to_device(self, host: np.ndarray) -> torch.Tensor:
        """A device copy of the 1-D array `host` (int64 / int32 / float32), enqueued on the current stream."""
        src = torch.from_numpy(np.ascontiguousarray(host))
        if not self._cuda:
            return src
        slot = self._next
        self._next = (slot + 1) % len(self._bufs)
        nbytes = src.numel() * src.element_size()
        buf = self._bufs[slot]
        if buf is None or buf.numel() < nbytes:
            if self._events[slot] is not None:
                self._events[slot].synchronize()
            buf = self._bufs[slot] = torch.empty(max(nbytes, self._capacity), dtype=torch.uint8, pin_memory=True)
        elif self._events[slot] is not None:
            self._events[slot].synchronize()  # the copy that last read this slot has run
        staged = buf[:nbytes].view(src.dtype)
        staged.copy_(src)
        out = staged.to(self.device, non_blocking=True)
        event = self._events[slot] or torch.cuda.Event()
        event.record()
        self._events[slot] = event
        return out
