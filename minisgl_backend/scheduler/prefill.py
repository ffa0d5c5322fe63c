"""PrefillManager: the pending queue, admission in the policy's order, and chunked prefill of long prompts."""

from __future__ import annotations

from collections import deque
from typing import Iterator

from minisgl_backend.batch import Req, ScheduledReq
from minisgl_backend.scheduler.adapters import AdapterResidency
from minisgl_backend.scheduler.cache import CacheManager
from minisgl_backend.scheduler.policy import SchedulePolicy
from minisgl_backend.scheduler.table import TableManager


class PrefillManager:
    def __init__(self, cache: CacheManager, table: TableManager, chunk_size: int,
                 policy: SchedulePolicy | None = None, adapters: AdapterResidency | None = None) -> None:
        self.cache = cache
        self.adapters = adapters
        self.table = table
        self.chunk_size = chunk_size
        self.policy = policy if policy is not None else SchedulePolicy("fcfs", cache)
        self.pending: deque[Req] = deque()  # arrival order (retracted requests at the front)
        self.chunked: Req | None = None  # admitted, prompt only partly computed

    def add(self, req: Req, front: bool = False) -> None:
        """`front`: a retracted request, which resumes before anything new."""
        if front:
            self.pending.appendleft(req)
        else:
            self.pending.append(req)
        self.policy.enqueued(req, aged=front)

    def remove(self, req: Req) -> bool:
        if self.chunked is req:
            self.chunked = None
            return True
        try:
            self.pending.remove(req)
        except ValueError:
            return False
        self.policy.dequeued(req)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.pending) or self.chunked is not None

    def schedule(self, budget: int, decode_reserve: int) -> list[ScheduledReq]:
        """Pick prefill work of at most `budget` tokens: the chunked request first, then pending
        requests in the policy's order (see policy.py).

        Admission needs a free table row (one per running request) and pages for the whole
        prompt while `decode_reserve` pages stay available for the running requests to grow.
        The first candidate that cannot be admitted stops admission: nobody overtakes it. The
        exception is a request whose LoRA adapter finds every slot busy: the others go ahead of
        it until it has waited `max_wait_steps` (then it stops admission like any other, so the
        slots' requests drain and one is freed for it).
        """
        items: list[ScheduledReq] = []
        if self.chunked is not None and budget > 0:
            req, self.chunked = self.chunked, None
            items.append(self._next_chunk(req, budget))
            budget -= items[-1].end - items[-1].start
        for req in self._candidates():
            if budget <= 0 or self.chunked is not None:
                break
            admitted = self._admit(req, decode_reserve)
            if admitted is None and not self.policy.is_aged(req):
                continue
            if not admitted:
                break
            self.pending.remove(req)
            self.policy.dequeued(req)
            items.append(self._next_chunk(req, budget))
            budget -= items[-1].end - items[-1].start
        return items

    def _candidates(self) -> Iterator[Req]:
        """The policy's picks from the head of the queue, then the rest in arrival order."""
        ordered = self.policy.order(self.pending)
        yield from ordered
        tried = set(ordered)
        yield from [req for req in self.pending if req not in tried]

    def _admit(self, req: Req, decode_reserve: int) -> bool | None:
        """Take a table row, lock the cached prefix and reserve pages for the whole prompt (and its
        adapter's slot). None: its adapter must wait for a slot."""
        if self.table.free_rows == 0:
            return False
        if self.adapters is not None and not self.adapters.acquire(req):
            return None
        tokens = req.all_ids
        req.row = self.table.allocate_row()
        self.cache.match_and_lock(req, tokens, reuse=not req.needs_prompt_logprobs)
        need = self.cache.pages_for(len(tokens)) - req.num_pages
        if need + decode_reserve > self.cache.available_pages:
            self.cache.release(req, [])
            self.table.free_row(req.row)
            req.row = -1
            if self.adapters is not None:
                self.adapters.release(req)
            return False
        self.cache.record_match(req, len(tokens))
        self.cache.allocate(req, len(tokens))
        self.table.write_tokens(req.row, 0, tokens)
        req.device_len = len(tokens)
        return True

    def _next_chunk(self, req: Req, budget: int) -> ScheduledReq:
        start = req.cached_len
        end = min(req.device_len, start + min(budget, self.chunk_size))
        samples = end == req.device_len
        req.cached_len = end
        if samples:
            req.device_len += 1  # the sampled id lands in the token pool at position `end`
        else:
            self.chunked = req
        return ScheduledReq(req, start, end, samples)
