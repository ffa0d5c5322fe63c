"""A request's state inside the scheduler, and the batch of work the engine runs for one step."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from minisgl_backend.sampling_params import SamplingParams


@dataclass(eq=False)
class Req:
    """One request inside the scheduler.

    Positions [0, cached_len) have K/V in the cache (or scheduled to); the token pool row holds
    ids for [0, device_len). After a batch that samples, cached_len == device_len - 1.
    """

    rid: int
    input_ids: list[int]
    params: SamplingParams
    seed: int
    max_output_tokens: int
    arrival_time: float = 0.0
    lora: str | None = None  # the LoRA adapter's folder (its prefix-cache namespace); None: the base model
    output_ids: list[int] = field(default_factory=list)
    row: int = -1
    cached_len: int = 0
    device_len: int = 0
    pages: list[int] = field(default_factory=list)
    cache_node: Any = None  # locked radix node: the request's pages [0, locked_len / page_size) are the tree's
    locked_len: int = 0
    matched_len: int = 0  # prefix tokens served from the radix cache at admission
    inflight: int = 0  # scheduled batches whose results are not processed yet
    finished: bool = False
    finish_sent: bool = False
    first_scheduled_time: float = 0.0
    grammar: Any = None  # GrammarState of a constrained request, set once its grammar compiled
    # prompt_logprobs collected so far: one per prompt token after the first (and its TopLogprobs)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top: list[Any] = field(default_factory=list)
    # device_len below which another decode step may be scheduled (-1: none at all)
    max_device_len: int = field(init=False, default=-1)
    # a step ending at `end` >= this takes the plain argmax as its next id (never: sys.maxsize)
    argmax_from: int = field(init=False, default=sys.maxsize)
    ngram: Any = field(init=False, default=None)  # NgramIndex of its tokens, built at its first draft
    spec: Any = field(init=False, default=None)  # Payoff: whether its drafts pay (speculative decoding)
    lora_slot: int = field(init=False, default=-1)  # its adapter's device slot while admitted (-1: none)

    def __post_init__(self) -> None:
        if self.max_output_tokens > 0:
            self.max_device_len = len(self.input_ids) + self.max_output_tokens
        if self.params.argmax_only:  # before min_tokens, EOS and stop ids are suppressed
            self.argmax_from = len(self.input_ids) + self.params.min_tokens

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asked for prompt logprobs that are not all computed yet (its prefix cache is not used)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.input_ids) - 1

    @property
    def wants_more(self) -> bool:
        """Whether another decode step may be scheduled (length limit not yet reached)."""
        return not self.finished and self.device_len < self.max_device_len


@dataclass
class ScheduledReq:
    """Positions [start, end) of one request computed in a step.

    A verify item (`drafts` not empty) computes the request's last token and its drafts, which
    sit in the token pool at [start + 1, end): every one of its positions is a sampling row of
    its own (`rows`), as if each were a decode step that had accepted the drafts before it.
    """

    req: Req
    start: int  # first position computed in this batch
    end: int  # one past the last position computed
    samples: bool  # whether this batch samples the request's next token
    drafts: list[int] = field(default_factory=list)  # drafted ids at positions [start + 1, end)

    @property
    def num_rows(self) -> int:
        """Sampling rows: one per position of a verify item, else one."""
        return self.end - self.start if self.drafts else 1

    def rows(self) -> list["ScheduledReq"]:
        """A verify item as one-position decode rows (position p samples the id at p + 1)."""
        if not self.drafts:
            return [self]
        return [ScheduledReq(self.req, p, p + 1, True) for p in range(self.start, self.end)]


@dataclass
class Batch:
    items: list[ScheduledReq]
    is_decode: bool
    grammar_mask: Any = None  # GrammarMask: allowed tokens of the constrained rows (scheduler-built)

    @property
    def size(self) -> int:
        return len(self.items)

    @property
    def num_tokens(self) -> int:
        return sum(item.end - item.start for item in self.items)

    @property
    def has_drafts(self) -> bool:
        return any(item.drafts for item in self.items)

    def rows(self) -> list[ScheduledReq]:
        """The sampling rows of the step, item after item (`ScheduledReq.rows`); the items
        themselves when nothing is verified. Computed on each call: fault isolation may drop items."""
        if not self.has_drafts:
            return self.items
        return [row for item in self.items for row in item.rows()]
