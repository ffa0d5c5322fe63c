"""Speculative decoding in the scheduler: which decoding requests draft in a step, and what.

Drafts come from a `DraftSource` (the n-gram drafter, `ngram.py`), made on the host from ids the
scheduler already has, never from the device. The engine verifies them (`engine/speculative.py`);
the scheduler keeps the longest run the model agrees with. The switch has two levels: a step
speculates only while at most `speculative_max_batch_size` requests decode, and within it a
request drafts only as many tokens as pay (`spec_cost.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from minisgl_backend.batch import Batch, Req
from minisgl_backend.config import SpeculativeConfig
from minisgl_backend.scheduler.ngram import NgramDrafter
from minisgl_backend.scheduler.spec_cost import Payoff, StepCost


class DraftSource(Protocol):
    def draft(self, req: Req, k: int) -> list[int]:
        """Up to `k` ids that may follow the request's ids on the host."""

    def would_draft(self, req: Req) -> bool:
        """Judged on the ids on the host while the request's last id is still in flight."""


@dataclass
class SpeculationStats:
    """Cumulative counts (the StatsEvent carries them; metrics derive rates)."""

    verify_rows: int = 0  # requests verified (one per request and step)
    draft_tokens: int = 0
    accepted_tokens: int = 0  # drafts the model agreed with (each verify row adds one more token)

    def record(self, drafted: int, accepted: int) -> None:
        self.verify_rows += 1
        self.draft_tokens += drafted
        self.accepted_tokens += accepted


class Speculator:
    """A request drafts in a step when the step speculates, its ids are all on the host (no
    batch of it in flight), drafts pay at its acceptance rate (`StepCost.best_drafts`) and its
    source has some; the others decode plainly in the same step. A request that does not draft
    keeps a shadow draft, scored against the ids that follow, so its rate stays current."""

    def __init__(self, config: SpeculativeConfig, source: DraftSource | None = None) -> None:
        self.config = config
        self.k = config.speculative_num_tokens
        self.enabled = config.enabled
        self.source = source if source is not None else NgramDrafter(config.ngram_min, config.ngram_max)
        self.cost = StepCost.free(self.k)  # replaced by the measured one at start-up
        self.stats = SpeculationStats()

    def active(self, num_decoding: int) -> bool:
        return self.enabled and 0 < num_decoding <= self.config.speculative_max_batch_size

    def plan(self, decodable: list[Req]) -> dict[int, list[int]]:
        """rid -> drafts of the requests that speculate this step (empty: none)."""
        if not self.active(len(decodable)):
            return {}
        drafts = {}
        for req in decodable:
            payoff = _payoff(req)
            payoff.check_shadow(req)
            n = self.cost.best_drafts(payoff.rate, len(decodable), self.k)
            if n and not req.inflight:
                draft = self._draft(req, n)
                if draft:
                    drafts[req.rid] = draft
            elif not n and not payoff.shadow:
                payoff.keep_shadow(req, self.source.draft(req, self.k))
        return drafts

    def verified(self, req: Req, drafted: int, accepted: int) -> None:
        self.stats.record(drafted, accepted)
        _payoff(req).record(drafted, accepted)

    def needs_previous_tokens(self, in_flight: Batch, decodable: list[Req]) -> bool:
        """Overlap: whether the next step must wait for `in_flight`'s results: it verified drafts
        (its requests' lengths are known only then), or the next step will speculate and a
        request whose last id is in flight would draft (`DraftSource.would_draft`)."""
        if in_flight.has_drafts:
            return True
        return self.active(len(decodable)) and any(
            r.inflight and self.cost.best_drafts(_payoff(r).rate, len(decodable), self.k)
            and self.source.would_draft(r) for r in decodable)

    def _draft(self, req: Req, n: int) -> list[int]:
        # the last draft may sit at max_device_len - 1: the id sampled after it is the last one
        k = min(n, req.max_device_len - req.device_len - 1)
        if k < 1:
            return []
        draft = self.source.draft(req, k)[:k]
        if draft and req.grammar is not None:  # drafts the grammar refuses are never accepted
            draft = draft[:req.grammar.valid_prefix(draft)]
        return draft


def _payoff(req: Req) -> Payoff:
    if req.spec is None:
        req.spec = Payoff()
    return req.spec
