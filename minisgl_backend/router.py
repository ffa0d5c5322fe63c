"""The one request path of the frontend side, shared by the Triton model and the offline `LLM`.

`RequestRouter` owns the stream table: it tokenizes and checks a prompt, gives it a request id,
sends it to the scheduler, routes the scheduler's token events to the request's
`RequestStream`, and turns them into `StreamOutput`s (incremental text, stop strings) for the
request's consumer. A stop string ends the request here and aborts it in the scheduler.

Delivery: by default a stream's output is built and handed to its consumer as soon as its
events arrive. With a `deliver` hook the router only announces that a stream has news; the
caller builds the output later with `take(stream)`, from whatever thread it likes, and gets
every token that arrived in between in one output (that is how a slow sender coalesces).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from minisgl_backend.detokenizer import IncrementalDetokenizer
from minisgl_backend.messages import (AbortMsg, ErrorKind, FinishReason, SchedulerInput, SchedulerOutput,
                                      TokenEvent, UserMsg)
from minisgl_backend.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """The request cannot be served as sent; the message says what to change."""


@dataclass
class StreamOutput:
    rid: int
    text: str  # new text since the previous output
    token_ids: list[int]  # new ids since the previous output
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0  # cumulative
    logprobs: list[float] | None = None
    cached_tokens: int = 0
    queue_time: float = 0.0
    error_kind: ErrorKind | None = None  # set with `error`


Consumer = Callable[[StreamOutput], None]


class RequestStream:
    """One request on the frontend side: ids received and not yet delivered, the detokenizer,
    stop strings and counters. `add` runs on the receiving thread, `take` on the delivering one."""

    def __init__(self, rid: int, tokenizer: Any, input_ids: list[int], params: SamplingParams,
                 consumer: Consumer) -> None:
        self.rid = rid
        self.consumer = consumer
        self.num_input_tokens = len(input_ids)
        self.detok = IncrementalDetokenizer(tokenizer, input_ids, params.stop)
        self.has_stop_strings = bool(params.stop)
        self.num_output_tokens = 0  # delivered
        self.cached_tokens = 0
        self.queue_time = 0.0
        self.finished = False  # the final output was built
        self.stop_hit = False  # a stop string ended the request: the scheduler must abort it
        self._lock = threading.Lock()
        self._ids: list[int] = []
        self._logprobs: list[float] = []
        self._end: TokenEvent | None = None  # the scheduler's last event for this request
        self._started = False

    def add(self, event: TokenEvent) -> None:
        with self._lock:
            if self._end is not None:
                return
            if event.token_ids and not self._started:
                self._started = True
                self.cached_tokens, self.queue_time = event.cached_tokens, event.queue_time
            self._ids.extend(event.token_ids)
            if event.logprobs:
                self._logprobs.extend(event.logprobs)
            if event.finish_reason is not None:
                self._end = event

    def fail(self, message: str, kind: ErrorKind) -> None:
        self.add(TokenEvent(self.rid, [], FinishReason.ERROR, error=message, error_kind=kind))

    def take(self) -> StreamOutput | None:
        """Everything received since the last output, as one output (None: nothing new)."""
        with self._lock:
            if self.finished or (not self._ids and self._end is None):
                return None
            ids, logprobs, end = self._ids, self._logprobs, self._end
            self._ids, self._logprobs = [], []
            self.finished = end is not None
        text, ids, reason = self._detokenize(ids, end)
        if reason is FinishReason.STOP and end is None:
            self.stop_hit = self.finished = True
        self.num_output_tokens += len(ids)
        return StreamOutput(self.rid, text, ids, self.finished, reason, end.error if end else None,
                            self.num_input_tokens, self.num_output_tokens,
                            logprobs[:len(ids)] if logprobs else None, self.cached_tokens, self.queue_time,
                            end.error_kind if end else None)

    def _detokenize(self, ids: list[int], end: TokenEvent | None) -> tuple[str, list[int], FinishReason | None]:
        reason = end.finish_reason if end is not None else None
        if self.has_stop_strings:  # one id at a time: the output must end at the id that completed it
            pieces = []
            for i, token in enumerate(ids):
                step = self.detok.feed([token])
                pieces.append(step.text)
                if step.stopped:
                    return "".join(pieces), ids[:i + 1], FinishReason.STOP
            text = "".join(pieces)
        else:
            text = self.detok.feed(ids).text if ids else ""
        if reason is not None and reason is not FinishReason.ERROR:
            text += self.detok.flush()
        return text, ids, reason


def tokenize_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise InvalidRequest("input_ids must be a list of integers")
    return list(prompt)


def check_prompt(input_ids: list[int], context_len: int) -> None:
    """The checks worth an immediate error before a request is queued."""
    if not input_ids:
        raise InvalidRequest("the prompt is empty: send at least one token of text")
    if len(input_ids) >= context_len:
        raise InvalidRequest(f"the prompt has {len(input_ids)} tokens but the context holds at most "
                             f"{context_len} (prompt plus at least one output token): shorten it")


class RequestRouter:
    def __init__(self, tokenizer: Any, context_len: int, send: Callable[[SchedulerInput], None],
                 deliver: Callable[[RequestStream], None] | None = None) -> None:
        self.tokenizer = tokenizer
        self.context_len = context_len
        self._send = send
        self._deliver_hook = deliver
        self._streams: dict[int, RequestStream] = {}
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._closed: str | None = None  # why no request is accepted anymore

    def prepare(self, prompt: str | list[int]) -> list[int]:
        """Token ids of `prompt`, checked against the context (InvalidRequest otherwise)."""
        input_ids = tokenize_prompt(self.tokenizer, prompt)
        check_prompt(input_ids, self.context_len)
        return input_ids

    def submit(self, prompt: str | list[int], params: SamplingParams, consumer: Consumer) -> int:
        input_ids = self.prepare(prompt)
        rid = next(self._rids)
        stream = RequestStream(rid, self.tokenizer, input_ids, params, consumer)
        with self._lock:  # the same lock as close(): a stream is either failed or never added
            if self._closed is not None:
                raise RuntimeError(f"the engine is not running ({self._closed}); reload the model "
                                   "or restart the server")
            self._streams[rid] = stream
        try:
            self._send(UserMsg(rid, input_ids, params, time.monotonic()))
        except Exception:
            with self._lock:
                self._streams.pop(rid, None)
            raise
        return rid

    def abort(self, rid: int) -> None:
        if rid in self._streams:
            self._send(AbortMsg(rid))

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def dispatch(self, events: list[SchedulerOutput]) -> list[SchedulerOutput]:
        """Route the token events to their streams; returns the other events for the caller."""
        news: dict[int, RequestStream] = {}
        others: list[SchedulerOutput] = []
        with self._lock:
            for event in events:
                if not isinstance(event, TokenEvent):
                    others.append(event)
                    continue
                stream = self._streams.get(event.rid)
                if stream is None:
                    continue  # finished already (a stop string), or never ours
                stream.add(event)
                if event.finish_reason is not None:
                    del self._streams[event.rid]
                news[event.rid] = stream
        for stream in news.values():
            self._deliver(stream)
        return others

    def take(self, stream: RequestStream) -> StreamOutput | None:
        """The stream's next output; a stop string ends the request and aborts it in the scheduler."""
        out = stream.take()
        if out is not None and stream.stop_hit and out.finished:
            with self._lock:
                ours = self._streams.pop(stream.rid, None) is not None
            if ours:
                self._send(AbortMsg(stream.rid))
        return out

    def close(self, message: str, kind: ErrorKind = ErrorKind.ENGINE) -> None:
        """Accept nothing more and end every stream in flight with an error."""
        with self._lock:
            if self._closed is None:
                self._closed = message
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.fail(message, kind)
            self._deliver(stream)

    def _deliver(self, stream: RequestStream) -> None:
        if self._deliver_hook is not None:
            self._deliver_hook(stream)
            return
        out = self.take(stream)
        if out is not None:
            deliver_to(stream, out)


def deliver_to(stream: RequestStream, out: StreamOutput) -> None:
    try:
        stream.consumer(out)
    except Exception:  # a broken consumer must not stop the stream of everyone else
        logger.exception("stream consumer failed for request %d", out.rid)
