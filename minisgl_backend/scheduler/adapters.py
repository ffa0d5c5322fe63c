"""Which LoRA adapters sit in the engine's device slots, by the requests admitted to run on them.

An adapter is loaded into a slot when the first request of it is admitted, and stays there while
any admitted request (prefilling, decoding, or finished with results in flight) uses it; an idle
one is evicted least recently used when another needs its slot. A request whose adapter finds
every slot busy stays in the queue (`PrefillManager`). Every TP rank makes the same decisions,
from the same messages, and loads its own shard of the adapter into the same slot.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from minisgl_backend.batch import Req
from minisgl_backend.lora.slots import SlotTable


class AdapterResidency:
    def __init__(self, max_loras: int, load: Callable[[int, str], None]) -> None:
        self.table = SlotTable(max_loras, load)
        self._users: Counter[str] = Counter()  # adapter folder -> admitted requests of it

    def acquire(self, req: Req) -> bool:
        """Give an admitted request its adapter's slot (loading it); False: every slot is busy."""
        if req.lora is None:
            return True
        slot = self.table.slot_for(req.lora, busy=lambda path: self._users[path] > 0)
        if slot is None:
            return False
        self._users[req.lora] += 1
        req.lora_slot = slot
        return True

    def release(self, req: Req) -> None:
        if req.lora_slot < 0:
            return
        self._users[req.lora] -= 1
        if not self._users[req.lora]:
            del self._users[req.lora]
        req.lora_slot = -1

    def drop(self, path: str) -> None:
        """An unloaded adapter leaves its slot (kept while a request still uses it: LRU later)."""
        if not self._users[path]:
            self.table.drop(path)

    @property
    def loads(self) -> int:
        return self.table.loads

    @property
    def evictions(self) -> int:
        return self.table.evictions

    def users(self) -> dict[str, int]:
        """Adapter folder -> admitted requests of it."""
        return dict(self._users)

    def resident(self) -> dict[str, int]:
        return self.table.resident()
