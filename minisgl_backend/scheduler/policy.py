"""Which waiting requests are admitted first: FCFS, or the longest cached prefix first (SGLang's
`lpm`), with an aging bound so that no request is passed over forever.

Everything here counts scheduler steps, never wall time: every TP rank must compute the same
order from the same messages.
"""

from __future__ import annotations

from collections import deque
from itertools import islice

from minisgl_backend.batch import Req
from minisgl_backend.scheduler.cache import CacheManager
from minisgl_backend.scheduler.radix import RadixTree


def cached_prefix_len(tree: RadixTree, tokens: list[int], namespace: str | None = None) -> int:
    """How many tokens of `tokens[:-1]` the tree holds (what admission would match), read-only:
    unlike `RadixTree.match_prefix` it neither splits nodes nor touches the LRU clock."""
    ps, limit = tree.page_size, len(tokens) - 1
    node, pos = tree.find_namespace(namespace), 0
    if node is None:
        return 0
    while pos + ps <= limit:
        child = node.children.get(tuple(tokens[pos:pos + ps]))
        if child is None:
            break
        offset = 0
        while offset < len(child.key) and pos + ps <= limit and \
                child.key[offset:offset + ps] == tuple(tokens[pos:pos + ps]):
            offset += ps
            pos += ps
        if offset < len(child.key):
            break
        node = child
    return pos


class SchedulePolicy:
    """Orders the head of the pending queue for admission.

    `fcfs`: arrival order. `lpm`: the oldest `window` waiting requests go longest-cached-prefix
    first (ties in arrival order), so requests that share a cached prefix run while it is still
    cached; the window bounds the sort's cost under a long queue, as SGLang's does. Either way a
    request that has waited `max_wait_steps` steps is aged: aged requests go first, in arrival order.
    """

    window = 128

    def __init__(self, name: str, cache: CacheManager, max_wait_steps: int = 256) -> None:
        self.name = name
        self.cache = cache
        self.max_wait_steps = max_wait_steps
        self.step = 0
        self._enqueued: dict[Req, int] = {}  # request -> step it (last) entered the queue
        self._prefix: dict[Req, int] = {}  # memo of cached_prefix_len while the tree is unchanged
        self._tree_signature: tuple[int, int] = (-1, -1)

    def tick(self) -> None:
        self.step += 1

    def enqueued(self, req: Req, aged: bool = False) -> None:
        """`aged`: the request goes first at once (a retracted request resumes before new ones)."""
        self._enqueued[req] = self.step - self.max_wait_steps if aged else self.step

    def dequeued(self, req: Req) -> None:
        self._enqueued.pop(req, None)
        self._prefix.pop(req, None)

    def waited(self, req: Req) -> int:
        return self.step - self._enqueued.get(req, self.step)

    def is_aged(self, req: Req) -> bool:
        return self.waited(req) >= self.max_wait_steps

    def order(self, pending: deque[Req]) -> list[Req]:
        """The first candidates for admission, best first (up to `window` of them; after them the
        caller goes on in arrival order)."""
        head = list(islice(pending, self.window))
        if self.name == "fcfs" or not self.cache.enable_prefix_cache:
            return head
        aged = [r for r in head if self.is_aged(r)]
        fresh = [r for r in head if not self.is_aged(r)]
        self._refresh_memo()
        fresh.sort(key=self._prefix_len, reverse=True)  # stable: ties stay in arrival order
        return aged + fresh

    def _prefix_len(self, req: Req) -> int:
        n = self._prefix.get(req)
        if n is None:
            n = self._prefix[req] = cached_prefix_len(self.cache.tree, req.all_ids, req.lora)
        return n

    def _refresh_memo(self) -> None:
        # Pages enter the tree by insert (its size grows) and leave by eviction (counted); a stale
        # memo could only misorder the queue, never break admission (which matches afresh).
        signature = (self.cache.tree.total_pages, self.cache.evicted_pages)
        if signature != self._tree_signature:
            self._tree_signature = signature
            self._prefix.clear()
