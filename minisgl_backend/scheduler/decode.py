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

    def schedule(self, drafts: dict[int, list[int]] | None = None) -> list[ScheduledReq]:
        """One decode item per decodable request; a request with `drafts[rid]` gets a verify item
        over its last token and the drafts that fit in the pages left once every plain decode
        has its page (speculation never causes a retraction). Its lengths are provisional (all
        drafts accepted) until the step is processed (`verified`)."""
        items = []
        reqs = self.decodable()
        spare = self.cache.available_pages - self._need(reqs)
        for req in reqs:
            draft = drafts.get(req.rid, []) if drafts else []
            if draft:
                draft, spare = self._fit(req, draft, spare)
            end = req.device_len + len(draft)
            if end > req.num_pages * self.cache.page_size:
                self.cache.allocate(req, end)
            items.append(ScheduledReq(req, req.device_len - 1, end, True, draft))
            req.cached_len = end
            req.device_len = end + 1
        return items

    def verified(self, item: ScheduledReq, kept: int) -> None:
        """After a verify item's step: `kept` ids were appended (the accepted drafts and the one
        after them); the rejected positions' pages go back to the free list."""
        req = item.req
        req.cached_len = item.start + kept
        req.device_len = item.start + kept + 1
        self.cache.truncate(req, req.device_len)

    def _fit(self, req: Req, draft: list[int], spare: int) -> tuple[list[int], int]:
        """The part of `draft` whose positions fit the request's pages plus `spare` free ones."""
        cache = self.cache
        own = max(req.num_pages, cache.pages_for(req.device_len))
        room = (own + spare) * cache.page_size - req.device_len
        draft = draft[:max(room, 0)]
        return draft, spare - max(cache.pages_for(req.device_len + len(draft)) - own, 0)

    def _need(self, reqs: list[Req]) -> int:
        page_size = self.cache.page_size
        return sum(1 for r in reqs if r.device_len > len(r.pages) * page_size)  # needs one more page

    def _reclaimable(self, req: Req) -> int:
        # A retracted request's pages go to the tree (evictable) or the free list; the prefix
        # it shares with others stays locked by them, so count only pages it alone holds.
        return req.num_pages - req.locked_len // self.cache.page_size
