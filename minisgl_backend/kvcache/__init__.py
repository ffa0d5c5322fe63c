"""The KV pool and the page table: what the attention backends, the engine and the scheduler share."""

from minisgl_backend.kvcache.pool import KVCache
from minisgl_backend.kvcache.table import PageTable

__all__ = ["KVCache", "PageTable"]
