"""Host arrays <-> device tensors through persistent pinned buffers (the per-step metadata that
addresses the KV pool and the page table, and the sampled ids coming back): one copy per array,
no allocation, no sync."""

from __future__ import annotations

import weakref

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
        slot, staged = self._stage(src)
        out = staged.to(self.device, non_blocking=True)
        self._record(slot)
        return out

    def copy_into(self, dst: torch.Tensor, host: np.ndarray) -> None:
        """dst[...] = host (a 1-D array of dst's dtype and size), enqueued on the current stream."""
        src = torch.from_numpy(np.ascontiguousarray(host))
        if src.dtype != dst.dtype or src.numel() != dst.numel():
            raise ValueError(f"{src.numel()} {src.dtype} values for a {dst.numel()} {dst.dtype} tensor")
        if not self._cuda:
            dst.copy_(src.view(dst.shape))
            return
        slot, staged = self._stage(src)
        dst.copy_(staged.view(dst.shape), non_blocking=True)
        self._record(slot)

    def _stage(self, src: torch.Tensor) -> tuple[int, torch.Tensor]:
        """src written into the next pinned slot, once the copy that last read that slot has run."""
        slot = self._next
        self._next = (slot + 1) % len(self._bufs)
        nbytes = src.numel() * src.element_size()
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        buf = self._bufs[slot]
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[slot] = torch.empty(max(nbytes, self._capacity), dtype=torch.uint8, pin_memory=True)
        staged = buf[:nbytes].view(src.dtype)
        staged.copy_(src)
        return slot, staged

    def _record(self, slot: int) -> None:
        event = self._events[slot] or torch.cuda.Event()
        event.record()
        self._events[slot] = event


class HostResults:
    """Device results -> persistent pinned host buffers, no allocation per step. A buffer goes back
    to the pool when the host view handed out for it is gone: the scheduler reads a step's ids one
    step later, fault isolation drops some results unread, and a result held longer (a benchmark
    that waits on it twice) is never overwritten. A buffer returned while its copy is still in
    flight is safe too: the next copy into it is ordered after it on the stream."""

    def __init__(self, capacity: int = 1024, pin: bool = True) -> None:
        self._capacity, self._pin = capacity, pin
        self._free: dict[torch.dtype, list[torch.Tensor]] = {}

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A host view of the 1-D device tensor `t`, filled by a copy enqueued on the current stream."""
        free = self._free.setdefault(t.dtype, [])
        n = t.numel()
        fits = [i for i, buf in enumerate(free) if buf.numel() >= n]
        if fits:
            buf = free.pop(fits[-1])
        else:
            buf = torch.empty(max(n, self._capacity), dtype=t.dtype, pin_memory=self._pin)
        out = buf[:n]
        out.copy_(t, non_blocking=True)
        weakref.finalize(out, free.append, buf)
        return out
