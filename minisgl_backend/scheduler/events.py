"""What one scheduler step tells the frontend, gathered as the step is processed."""

from __future__ import annotations

import math

from minisgl_backend.messages import SchedulerOutput, TokenBatch, TopLogprobs


class StepEvents:
    """Every sampled id of the step goes into one TokenBatch (two list appends per token, no
    object per token); other events (a request's start or end, stats, errors) keep their order
    and follow the batch, so a request's end never overtakes its last tokens."""

    def __init__(self) -> None:
        self._rids: list[int] = []
        self._tokens: list[int] = []
        self._logprobs: list[float] = []
        self._top: list[TopLogprobs | None] = []
        self._any_logprobs = False
        self._any_top = False
        self._events: list[SchedulerOutput] = []

    def token(self, rid: int, token: int, logprob: float | None, top: TopLogprobs | None = None) -> None:
        self._rids.append(rid)
        self._tokens.append(token)
        self._logprobs.append(math.nan if logprob is None else logprob)
        self._top.append(top)
        self._any_logprobs = self._any_logprobs or logprob is not None
        self._any_top = self._any_top or top is not None

    def append(self, event: SchedulerOutput) -> None:
        self._events.append(event)

    def __bool__(self) -> bool:
        return bool(self._rids) or bool(self._events)

    def take(self) -> list[SchedulerOutput]:
        out: list[SchedulerOutput] = []
        if self._rids:
            out.append(TokenBatch(self._rids, self._tokens, self._logprobs if self._any_logprobs else None,
                                  self._top if self._any_top else None))
            self._rids, self._tokens, self._logprobs, self._top = [], [], [], []
            self._any_logprobs = self._any_top = False
        out.extend(self._events)
        self._events = []
        return out
