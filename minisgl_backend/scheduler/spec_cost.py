"""When drafts pay: the measured cost of verifying them, and each request's acceptance record.

A draft costs a position in the step whether it is accepted or not; an accepted one saves the
request a plain step. Where a step is bound by reading the weights (a GPU at small batches) the
extra positions are nearly free; where small matrix products are compute bound (a CPU) a few
of them cost a good part of a step. `StepCost` holds what n drafts add to one request's decode
step, timed at start-up; `Payoff` a request's recent acceptance rate, from its verified drafts
and, while it does not speculate, from the drafts it would have made (checked against the ids
that followed, for free). Every decision counts steps, never time, so TP ranks decide alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from minisgl_backend.batch import Batch, Req, ScheduledReq
from minisgl_backend.engine.speculative import accepted_length
from minisgl_backend.sampling_params import SamplingParams
from minisgl_backend.scheduler.cache import CacheManager
from minisgl_backend.scheduler.table import TableManager

DECAY = 0.8  # weight of a request's earlier drafts in its acceptance rate, per draft
# drafts must be expected to save this much more than they cost: both sides are estimates (a
# rate from few drafts, step times from a short measurement), and a wrong guess costs a step
MARGIN = 0.25


@dataclass
class StepCost:
    """`one`: a decode step of one request; `extra[n]`: what n drafts add to it (extra[0] = 0)."""

    one: float
    extra: list[float]

    @classmethod
    def free(cls, k: int) -> "StepCost":
        """Drafts that cost nothing (before a measurement, or to force speculation in tests)."""
        return cls(1.0, [0.0] * (k + 1))

    def per_request(self, batch: int) -> float:
        """A plain step's time per request with `batch` requests decoding: the fixed part of the
        step (`one` less a position, the positions costing what the drafts did) shared out."""
        slope = self.extra[-1] / (len(self.extra) - 1) if len(self.extra) > 1 else 0.0
        return max(self.one - slope, 0.0) / batch + slope

    def best_drafts(self, rate: float, batch: int, k: int) -> int:
        """The number of drafts (0..k) with the largest expected gain: the j-th one is reached and
        accepted with probability rate^j and then saves a plain step's share of the request;
        what n drafts add counts `1 + MARGIN` times."""
        share, best, best_gain, saving, reach = self.per_request(batch), 0, 0.0, 0.0, 1.0
        for n in range(1, min(k, len(self.extra) - 1) + 1):
            reach *= rate
            saving += share * reach
            gain = saving - (1 + MARGIN) * self.extra[n]
            if gain > best_gain:
                best, best_gain = n, gain
        return best


@dataclass
class Payoff:
    """A request's acceptance rate: decayed counts of accepted drafts and of rejections (each
    verify, or each shadow draft, ends with at most one). A new request starts at 1/2."""

    accepted: float = 1.0
    rejected: float = 1.0
    shadow: list[int] = field(default_factory=list)  # a draft not verified, made at length `shadow_at`
    shadow_at: int = 0

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def record(self, drafted: int, accepted: int) -> None:
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (accepted < drafted)

    def check_shadow(self, req: Req) -> None:
        """Score the shadow draft against the ids that followed it, once they decide it."""
        if not self.shadow:
            return
        actual = _ids(req, self.shadow_at, self.shadow_at + len(self.shadow))
        accepted = accepted_length(self.shadow, actual)
        if accepted < len(actual) or len(actual) == len(self.shadow):
            self.record(len(self.shadow), accepted)
            self.shadow = []

    def keep_shadow(self, req: Req, draft: list[int]) -> None:
        self.shadow, self.shadow_at = draft, len(req.input_ids) + len(req.output_ids)


def _ids(req: Req, start: int, end: int) -> list[int]:
    """The request's ids at positions [start, end) (as far as it has them)."""
    n_in = len(req.input_ids)
    head = req.input_ids[start:min(end, n_in)] if start < n_in else []
    return head + req.output_ids[max(start - n_in, 0):max(end - n_in, 0)]


def measure_step_cost(engine, cache: CacheManager, table: TableManager, k: int,
                      context: int = 64, repeats: int = 5) -> StepCost:
    """Time a decode step of one request of `context` tokens with 0..k drafts on the engine (the
    best of `repeats` each, interleaved), then free what they used. Under tensor parallelism
    every rank measures and all keep the slowest figures, so they decide alike."""
    context = max(1, min(context, cache.num_pages * cache.page_size - k - 1))
    req = Req(-1, [0] * context, SamplingParams(temperature=0.0, max_tokens=k + 1), 0, k + 1)
    req.row = table.allocate_row()
    cache.match_and_lock(req, [], reuse=False)
    cache.allocate(req, context + k)
    table.write_tokens(req.row, 0, [0] * (context + k))
    batches = [Batch([ScheduledReq(req, context - 1, context + n, True, [0] * n)], is_decode=True)
               for n in range(k + 1)]
    best = [math.inf] * (k + 1)
    try:
        for _ in range(repeats + 1):  # the first round warms up
            for n, batch in enumerate(batches):
                start = time.perf_counter()
                engine.forward(batch).wait()
                best[n] = min(best[n], time.perf_counter() - start)
    finally:
        cache.release(req, [])
        table.free_row(req.row)
    best = _slowest_over_ranks(best, engine.device)
    extra = [max(t - best[0], 0.0) for t in best]
    # more positions never cost less: a dip is the measurement's noise
    return StepCost(best[0], [max(extra[:n + 1]) for n in range(len(extra))])


def _slowest_over_ranks(values: list[float], device) -> list[float]:
    from minisgl_backend.distributed.parallel_state import get_tp_size

    if get_tp_size() == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
