"""A rank's LoRA state on the device: the slots, loading an adapter's shard into one, and the
`LoraBatch` of each step. The host weights of the last `max_loras` adapters evicted from a slot
are kept, so an adapter that comes back is copied in without reading its folder again."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from minisgl_backend.batch import ScheduledReq
from minisgl_backend.config import LoraConfig
from minisgl_backend.distributed.parallel_state import get_tp_rank, get_tp_size
from minisgl_backend.kvcache.staging import HostStaging
from minisgl_backend.lora.adapter import LoraAdapter, load_adapter
from minisgl_backend.lora.apply import LoraBatch, token_runs
from minisgl_backend.lora.slots import LoraSlots, ModuleShape
from minisgl_backend.models.hf_config import ModelArchConfig


class DeviceLora:
    def __init__(self, config: LoraConfig, arch: ModelArchConfig, *, num_heads: int, num_kv_heads: int,
                 dtype: torch.dtype, device: torch.device, use_kernel: bool) -> None:
        self.config = config
        self.arch = arch
        tp = get_tp_size()
        q, kv, inter = num_heads * arch.head_dim, num_kv_heads * arch.head_dim, arch.intermediate_size // tp
        hidden = arch.hidden_size
        shapes = {"q": ModuleShape(hidden, q), "k": ModuleShape(hidden, kv), "v": ModuleShape(hidden, kv),
                  "o": ModuleShape(q, hidden), "gate": ModuleShape(hidden, inter),
                  "up": ModuleShape(hidden, inter), "down": ModuleShape(inter, hidden)}
        self.slots = LoraSlots.allocate(shapes, arch.num_hidden_layers, config.max_loras, config.max_lora_rank,
                                        dtype, device)
        self.use_kernel = use_kernel
        self._in_slot: dict[int, LoraAdapter] = {}
        self._evicted: OrderedDict[str, LoraAdapter] = OrderedDict()  # host weights, least recent first
        self.folder_reads = 0

    def load(self, slot: int, path: str) -> None:
        """Put this rank's shard of the adapter at `path` (checked when registered) into `slot`."""
        adapter = self._evicted.pop(path, None)
        if adapter is None:
            adapter = load_adapter(path, path, self.arch, self.config.max_lora_rank, get_tp_rank(), get_tp_size())
            self.folder_reads += 1
        previous = self._in_slot.get(slot)
        if previous is not None:
            self._evicted[previous.path] = previous
            while len(self._evicted) > self.config.max_loras:
                self._evicted.popitem(last=False)
        self.slots.load(slot, adapter)
        self._in_slot[slot] = adapter

    def forget(self, path: str) -> None:
        """An unloaded adapter's host weights go (its folder may change before it is loaded again)."""
        self._evicted.pop(path, None)
        for slot, adapter in list(self._in_slot.items()):
            if adapter.path == path:
                del self._in_slot[slot]

    def batch(self, rows: list[ScheduledReq], staging: HostStaging) -> LoraBatch | None:
        """The step's LoraBatch (None when every row runs the base model)."""
        slots = [r.req.lora_slot for r in rows]
        if max(slots, default=-1) < 0:
            return None
        per_token, runs = token_runs(slots, [r.end - r.start for r in rows])
        token_slots = staging.to_device(np.asarray(per_token, dtype=np.int64)) if self.use_kernel else None
        return LoraBatch(self.slots, token_slots, runs, self.use_kernel)

    def graph_batch(self, token_slots: torch.Tensor) -> LoraBatch:
        """What a captured decode graph runs: the kernels, reading each row's slot from a static buffer."""
        return LoraBatch(self.slots, token_slots, [], use_kernel=True)
