"""KV pages: the free list, the radix prefix cache and the page-table entries of each request."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minisgl_backend.batch import Req
from minisgl_backend.engine.transfer import copy_to
from minisgl_backend.scheduler.radix import RadixTree


@dataclass
class CacheStats:
    total_pages: int
    free_pages: int
    cached_pages: int
    locked_pages: int
    private_pages: int
    hit_tokens: int
    miss_tokens: int


class CacheManager:
    def __init__(self, num_pages: int, page_size: int, page_table: torch.Tensor,
                 enable_prefix_cache: bool = True) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.page_table = page_table
        self.enable_prefix_cache = enable_prefix_cache
        self.tree = RadixTree(page_size)
        self._free = list(range(num_pages - 1, -1, -1))
        self.hit_tokens = 0
        self.miss_tokens = 0
        self.evicted_pages = 0
        self._offsets = np.arange(page_size, dtype=np.int32)
        # on the CPU the table is written through a numpy view: one store instead of a chain of
        # torch ops for each page a decode step allocates
        self._table_view = page_table.numpy() if page_table.device.type == "cpu" else None

    # ------------------------------------------------------------ accounting

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def available_pages(self) -> int:
        """Pages that an allocation can get: free ones plus evictable cached ones."""
        return len(self._free) + self.tree.cached_pages

    def stats(self) -> CacheStats:
        private = self.num_pages - self.free_pages - self.tree.total_pages
        return CacheStats(self.num_pages, self.free_pages, self.tree.cached_pages,
                          self.tree.locked_pages, private, self.hit_tokens, self.miss_tokens)

    def integrity_problems(self, idle: bool) -> list[str]:
        """Pages owned twice or by nobody; `idle`: no request holds any page. Counted with numpy:
        it runs at every drain, and Python sets over a large pool's pages took tens of ms."""
        free = np.asarray(self._free, dtype=np.int64)
        tree = np.asarray(self.tree.all_pages(), dtype=np.int64)
        in_pool = lambda ids: ids[(ids >= 0) & (ids < self.num_pages)]  # noqa: E731
        in_free = np.bincount(in_pool(free), minlength=self.num_pages)
        in_tree = np.bincount(in_pool(tree), minlength=self.num_pages)
        checks = [
            (in_free.max(initial=0) > 1, "a page is on the free list twice"),
            (in_tree.max(initial=0) > 1 or tree.size != self.tree.total_pages,
             "the radix tree holds a page twice or miscounts its pages"),
            (((in_free > 0) & (in_tree > 0)).any(), "a page is both free and in the radix tree"),
            (in_free.sum() + in_tree.sum() != free.size + tree.size, "a page id is outside the pool"),
            (idle and ((in_free + in_tree) == 0).any(), "with nothing running, some page is neither free nor cached"),
        ]
        return [message for failed, message in checks if failed]

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # ------------------------------------------------------------ request lifecycle

    def match_and_lock(self, req: Req, tokens: list[int], reuse: bool = True) -> None:
        """Serve the longest cached prefix of `tokens[:-1]` (at least one token is always computed);
        `reuse` false: compute every position (prompt logprobs need their logits)."""
        if self.enable_prefix_cache and reuse:
            match = self.tree.match_prefix(tokens[:-1], req.lora)
            self.tree.lock(match.node)
            req.cache_node, req.pages = match.node, list(match.pages)
            req.cached_len = req.matched_len = req.locked_len = match.num_tokens
        else:
            req.cache_node, req.pages, req.cached_len, req.matched_len, req.locked_len = None, [], 0, 0, 0
        if req.pages:
            self._write_table(req.row, 0, req.pages)

    def record_match(self, req: Req, num_tokens: int) -> None:
        self.hit_tokens += req.matched_len
        self.miss_tokens += num_tokens - req.matched_len

    def allocate(self, req: Req, num_tokens: int) -> None:
        """Give `req` pages to cover positions [0, num_tokens); the caller checked availability."""
        need = self.pages_for(num_tokens) - req.num_pages
        if need <= 0:
            return
        if need > len(self._free):
            evicted = self.tree.evict(need - len(self._free))
            self.evicted_pages += len(evicted)
            self._free.extend(evicted)
        new_pages = [self._free.pop() for _ in range(need)]
        self._write_table(req.row, req.num_pages, new_pages)
        req.pages.extend(new_pages)

    def truncate(self, req: Req, num_tokens: int) -> None:
        """Free the request's pages past those that positions [0, num_tokens) need (rejected
        drafts' pages; they are private: the tree only ever holds a request's committed prefix)."""
        keep = max(self.pages_for(num_tokens), req.locked_len // self.page_size)
        if keep < req.num_pages:
            self._free.extend(req.pages[keep:])
            del req.pages[keep:]

    def share(self, req: Req, tokens_with_kv: list[int]) -> None:
        """A running request's page-aligned `tokens_with_kv` (its computed prompt) go into the tree
        now, so that requests admitted from now on reuse them (n choices of one prompt, a shared
        system prompt) instead of waiting for this one to finish. The request keeps them locked;
        its copies of pages the tree already had are freed, the tree's used instead (later steps
        read them in stream order, after every step already launched)."""
        locked = req.locked_len // self.page_size
        keep = min(len(tokens_with_kv) // self.page_size, req.num_pages) if self.enable_prefix_cache else 0
        if keep <= locked:
            return
        tokens = tokens_with_kv[:keep * self.page_size]
        existing = self.tree.insert(tokens, req.pages[:keep], req.lora)
        match = self.tree.match_prefix(tokens, req.lora)
        self.tree.lock(match.node)
        if req.cache_node is not None:
            self.tree.unlock(req.cache_node)
        if existing > locked:
            self._free.extend(req.pages[locked:existing])
            req.pages[locked:existing] = match.pages[locked:existing]
            self._write_table(req.row, locked, req.pages[locked:existing])
        req.cache_node, req.locked_len = match.node, keep * self.page_size

    def release(self, req: Req, tokens_with_kv: list[int]) -> None:
        """Donate the page-aligned part of `tokens_with_kv` to the tree; free everything else."""
        locked = req.locked_len // self.page_size  # the tree's own pages, locked by this request
        keep = min(len(tokens_with_kv) // self.page_size, req.num_pages) if self.enable_prefix_cache else 0
        in_tree = locked
        if keep > locked:
            in_tree = self.tree.insert(tokens_with_kv[:keep * self.page_size], req.pages[:keep], req.lora)
        # Private pages the tree already had a copy of are duplicates; past `keep` nothing is cached.
        self._free.extend(req.pages[locked:max(in_tree, locked)])
        self._free.extend(req.pages[max(keep, locked):])
        if req.cache_node is not None:
            self.tree.unlock(req.cache_node)
        req.cache_node, req.pages, req.matched_len, req.locked_len = None, [], 0, 0

    def drop_namespace(self, namespace: str) -> int:
        """Free the cached pages of an unloaded adapter; returns how many."""
        freed = self.tree.drop_namespace(namespace)
        self.evicted_pages += len(freed)
        self._free.extend(freed)
        return len(freed)

    def flush(self) -> int:
        """Evict every unlocked cached page; returns how many were freed."""
        freed = self.tree.evict(self.tree.cached_pages)
        self._free.extend(freed)
        return len(freed)

    # ------------------------------------------------------------ internals

    def _write_table(self, row: int, first_page: int, pages: list[int]) -> None:
        start = first_page * self.page_size
        slots = (np.asarray(pages, dtype=np.int32)[:, None] * self.page_size + self._offsets).ravel()
        width = min(len(slots), self.page_table.shape[1] - start)
        if self._table_view is not None:
            self._table_view[row, start:start + width] = slots[:width]
        else:
            copy_to(self.page_table[row, start:start + width], torch.from_numpy(slots[:width]))
