"""The scheduler's grammar bookkeeping: requests waiting for their compile, and each batch's mask.

Readiness under tensor parallelism: every rank compiles every constraint itself (the same
messages reach every rank), and a request leaves the waiting list only when its compile has
finished on EVERY rank: on a step where something waits (a state every rank shares), the ranks
take the minimum of their done-flags with one small all-reduce. So all ranks admit the request
at the same step and keep running the same schedule.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from minisgl_backend.batch import Batch, Req
from minisgl_backend.distributed.parallel_state import get_tp_size
from minisgl_backend.grammar.bitmask import GrammarMask, build_mask
from minisgl_backend.grammar.compiler import GrammarCompiler, GrammarError
from minisgl_backend.grammar.matcher import GrammarState

_IDLE_WAIT_S = 0.005  # how long an otherwise idle loop waits for a compile before polling messages


@dataclass
class GrammarFailure:
    req: Req
    message: str
    client_error: bool  # the constraint is at fault (not the server)


class GrammarManager:
    def __init__(self, tokenizer_factory: Callable[[], Any], vocab_size: int, stop_token_ids: Sequence[int],
                 device: str = "cpu", capacity: int = 64) -> None:
        self._tokenizer_factory = tokenizer_factory
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.device = device
        self.capacity = capacity
        self._compiler: GrammarCompiler | None = None  # created with the first constrained request
        self.waiting: list[tuple[Req, Future]] = []
        self.num_overlap_syncs = 0  # overlap steps that processed the previous batch first for a mask

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            self._compiler = GrammarCompiler(self._tokenizer_factory, self.vocab_size, self.stop_token_ids,
                                             self.capacity)
        return self._compiler

    def add(self, req: Req) -> None:
        self.waiting.append((req, self.compiler.submit(req.params.structured_outputs)))

    def remove(self, req: Req) -> None:
        self.waiting = [(r, f) for r, f in self.waiting if r is not req]

    def poll(self, idle: bool) -> tuple[list[Req], list[GrammarFailure]]:
        """Requests whose compile finished on every rank: ready ones (with their matcher), failed ones.

        `idle`: the scheduler has nothing else to do, so wait a little for a compile first.
        """
        if not self.waiting:
            return [], []
        futures = [f for _, f in self.waiting]
        if idle:
            wait(futures, timeout=_IDLE_WAIT_S, return_when=FIRST_COMPLETED)
        done = self._done_on_every_rank([f.done() for f in futures])
        ready, failed, still = [], [], []
        for (req, future), ok in zip(self.waiting, done):
            if not ok:
                still.append((req, future))
                continue
            exc = future.exception()
            if exc is None:
                req.grammar = GrammarState(future.result())
                ready.append(req)
            else:
                failed.append(GrammarFailure(req, str(exc) if isinstance(exc, GrammarError)
                                             else f"structured output failed: {exc!r}", isinstance(exc, GrammarError)))
        self.waiting = still
        return ready, failed

    def _done_on_every_rank(self, done: list[bool]) -> list[bool]:
        if get_tp_size() == 1:
            return done
        import torch.distributed as dist

        flags = torch.tensor(done, dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return [bool(x) for x in flags.tolist()]

    # ------------------------------------------------------------ per batch

    @staticmethod
    def _constrained(batch: Batch) -> list[GrammarState | None]:
        return [it.req.grammar if it.samples and not it.req.finished else None for it in batch.items]

    def mask_for(self, batch: Batch) -> GrammarMask | None:
        """The allowed next tokens of the batch's constrained rows (None: no row is constrained);
        a verify item's rows follow its drafts."""
        drafts = [it.drafts for it in batch.items] if batch.has_drafts else None
        return build_mask(self._constrained(batch), self.vocab_size, drafts)

    def needs_previous_tokens(self, batch: Batch) -> bool:
        """Overlap: whether `batch` (in flight) samples for a grammar, whose next mask needs that token."""
        needed = any(s is not None for s in self._constrained(batch))
        self.num_overlap_syncs += needed
        return needed

    def close(self) -> None:
        if self._compiler is not None:
            self._compiler.close()
