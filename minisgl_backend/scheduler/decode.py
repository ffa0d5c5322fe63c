"""DecodeManager: the running set, one token per request per step, retraction when pages run out."""

from __future__ import annotations

from minisgl_backend.batch import Req, ScheduledReq
from minisgl_backend.scheduler.cache import CacheManager


class DecodeManager:
    def __init__(self, cache: CacheManager) -> None:
        self.cache = cache
        self.running: list[Req] = []  # in admission order: the newest is retracted first

    def add(self, req: Req) -> None:
        self.running.append(req)

    def remove(self, req: Req) -> None:
        if req in self.running:
            self.running.remove(req)

    def decodable(self) -> list[Req]:
        return [r for r in self.running if r.wants_more]

    def pages_needed(self) -> int:
        """New pages the next decode step needs (a request crossing into a fresh page needs one)."""
        return self._need(self.decodable())

    def needs_retraction(self) -> bool:
        return self.pages_needed() > self.cache.available_pages

    def pick_victims(self) -> list[Req]:
        """The newest requests to retract so that everyone left can take one more step."""
        victims: list[Req] = []
        survivors = self.decodable()
        freed = 0
        while survivors and self._need(survivors) > self.cache.available_pages + freed:
            victim = survivors.pop()
            victims.append(victim)
            freed += self._reclaimable(victim)
        return victims

    def schedule(self) -> list[ScheduledReq]:
        items = []
        page_size = self.cache.page_size
        for req in self.decodable():
            if req.device_len > len(req.pages) * page_size:
                self.cache.allocate(req, req.device_len)
            items.append(ScheduledReq(req, req.device_len - 1, req.device_len, samples=True))
            req.cached_len = req.device_len
            req.device_len += 1
        return items

    def _need(self, reqs: list[Req]) -> int:
        page_size = self.cache.page_size
        return sum(1 for r in reqs if r.device_len > len(r.pages) * page_size)  # needs one more page

    def _reclaimable(self, req: Req) -> int:
        # A retracted request's pages go to the tree (evictable) or the free list; the prefix
        # it shares with others stays locked by them, so count only pages it alone holds.
        return req.num_pages - req.locked_len // self.cache.page_size
