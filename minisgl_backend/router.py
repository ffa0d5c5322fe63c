"""The one request path of the frontend side, shared by the Triton model and the offline `LLM`.

`RequestRouter` owns the stream table: it tokenizes and checks a prompt, gives it a request id,
sends it to the scheduler, routes the scheduler's token events to the request's
`RequestStream`, and turns them into `StreamOutput`s (incremental text, stop strings) for the
request's consumer. A stop string ends the request here and aborts it in the scheduler.

Delivery: by default a stream's output is built and handed to its consumer as soon as a step
brings it news worth delivering. With a `deliver` hook the router only announces that a
stream has such news; the caller builds the output later with `take(stream)`, from its own
thread, and gets every id that arrived in between in one output: a sender that falls behind
coalesces by itself, and detokenization is paid per output, not per id.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from minisgl_backend.detokenizer import IncrementalDetokenizer
from minisgl_backend.messages import (AbortMsg, ErrorKind, FinishReason, SchedulerInput, SchedulerOutput,
                                      TokenBatch, TokenEvent, TopLogprobs, UserMsg)
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
    top_logprobs: list[TopLogprobs] | None = None  # aligned with `logprobs` (rank and alternatives)
    # the first output of a request that asked prompt_logprobs: one per prompt token after the first
    prompt_logprobs: list[float] | None = None
    prompt_top: list[TopLogprobs] | None = None
    prompt_token_ids: list[int] | None = None  # with prompt_logprobs


Consumer = Callable[[StreamOutput], None]


class RequestStream:
    """One request on the frontend side: ids received and not yet delivered, the detokenizer,
    stop strings and counters. The router adds ids under its lock; `take` runs on the
    delivering thread (one at a time per stream).

    `deliver_every`: how many undelivered ids make the stream worth delivering before its end
    (None: only its end). Stop strings need every step, so that a hit ends the request at once.
    """

    def __init__(self, rid: int, tokenizer: Any, input_ids: list[int], params: SamplingParams,
                 consumer: Consumer, deliver_every: int | None = 1, inject_fault: bool = False) -> None:
        self.rid = rid
        self.consumer = consumer
        self.num_input_tokens = len(input_ids)
        self.input_ids = input_ids
        self.lora_name = params.lora_name
        self.detok = IncrementalDetokenizer(tokenizer, input_ids, params.stop)
        self.has_stop_strings = bool(params.stop)
        self.deliver_every = 1 if self.has_stop_strings else deliver_every
        self.inject_fault = inject_fault  # tests: detokenizing this request raises
        self.num_output_tokens = 0  # delivered
        self.cached_tokens = 0
        self.queue_time = 0.0
        self.finished = False  # the final output was built
        self.stop_hit = False  # a stop string ended the request: the scheduler must abort it
        self.queued = False  # free for the deliverer's bookkeeping (e.g. "in my ready queue")
        self.ids: list[int] = []  # received, not yet delivered (guarded by the router's lock)
        self.logprobs: list[float] = []
        self.top: list[TopLogprobs] = []
        self.start: TokenEvent | None = None  # the start event, until its prompt logprobs are delivered
        self.end: TokenEvent | None = None  # the scheduler's last event for this request

    @property
    def worth_delivering(self) -> bool:
        return self.end is not None or (self.deliver_every is not None and len(self.ids) >= self.deliver_every)

    def on_event(self, event: TokenEvent) -> None:
        if self.end is not None:
            return
        if event.finish_reason is None:  # the start: first token's metadata
            self.cached_tokens, self.queue_time = event.cached_tokens, event.queue_time
            if event.prompt_logprobs is not None:
                self.start = event
            return
        self.ids.extend(event.token_ids)
        if event.logprobs:
            self.logprobs.extend(event.logprobs)
        self.end = event

    def build_output(self, ids: list[int], logprobs: list[float], end: TokenEvent | None,
                     top: list[TopLogprobs] | None = None, start: TokenEvent | None = None) -> StreamOutput:
        """The output for `ids` (taken from the stream); the caller sets `finished` first."""
        try:
            text, ids, reason = self._detokenize(ids, end)
        except Exception as exc:  # this request's text cannot be made: fail it alone
            logger.exception("detokenizing request %d failed", self.rid)
            self.finished = True
            return StreamOutput(self.rid, "", ids, True, FinishReason.ERROR,
                                f"detokenization failed: {type(exc).__name__}: {exc}", self.num_input_tokens,
                                self.num_output_tokens, None, self.cached_tokens, self.queue_time, ErrorKind.REQUEST)
        if reason is FinishReason.STOP and end is None:
            self.stop_hit = self.finished = True
        self.num_output_tokens += len(ids)
        return StreamOutput(self.rid, text, ids, self.finished, reason, end.error if end else None,
                            self.num_input_tokens, self.num_output_tokens,
                            logprobs[:len(ids)] if logprobs else None, self.cached_tokens, self.queue_time,
                            end.error_kind if end else None, top[:len(ids)] if top else None,
                            start.prompt_logprobs if start else None, start.prompt_top if start else None,
                            self.input_ids if start else None)

    def _detokenize(self, ids: list[int], end: TokenEvent | None) -> tuple[str, list[int], FinishReason | None]:
        if self.inject_fault:
            raise RuntimeError("injected detokenization fault")
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
    """`stream_interval`: ids per output of a streamed request before its end (1: every step);
    a request submitted with `stream=False` is delivered once, at its end."""

    def __init__(self, tokenizer: Any, context_len: int, send: Callable[[SchedulerInput], None],
                 deliver: Callable[[RequestStream], None] | None = None, stream_interval: int = 1,
                 detokenize_fault_seed: int = -1, lora: Any = None) -> None:
        self.tokenizer = tokenizer
        self.lora = lora  # a LoraRegistry when adapters are served
        self.context_len = context_len
        self.stream_interval = stream_interval
        self._send = send
        self._deliver_hook = deliver
        self._fault_seed = detokenize_fault_seed
        self._streams: dict[int, RequestStream] = {}
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._closed: str | None = None  # why no request is accepted anymore

    def prepare(self, prompt: str | list[int]) -> list[int]:
        """Token ids of `prompt`, checked against the context (InvalidRequest otherwise)."""
        input_ids = tokenize_prompt(self.tokenizer, prompt)
        check_prompt(input_ids, self.context_len)
        return input_ids

    def submit(self, prompt: str | list[int], params: SamplingParams, consumer: Consumer,
               stream: bool = True) -> int:
        lora_path = self._lora_path(params.lora_name)
        input_ids = self.prepare(prompt)
        rid = next(self._rids)
        entry = RequestStream(rid, self.tokenizer, input_ids, params, consumer,
                              self.stream_interval if stream else None,
                              inject_fault=params.seed is not None and params.seed == self._fault_seed)
        with self._lock:  # the same lock as close(): a stream is either failed or never added
            if self._closed is not None:
                raise RuntimeError(f"the engine is not running ({self._closed}); reload the model "
                                   "or restart the server")
            self._streams[rid] = entry
        try:
            self._send(UserMsg(rid, input_ids, params, time.monotonic(), lora_path))
        except Exception:
            with self._lock:
                self._streams.pop(rid, None)
            raise
        return rid

    def _lora_path(self, name: str | None) -> str | None:
        if name is None:
            return None
        problem = "LoRA feature is not enabled." if self.lora is None else self.lora.check_request(name)
        if problem is not None:
            raise InvalidRequest(problem)
        return self.lora.path(name)

    def requests_of(self, lora_name: str) -> int:
        """Requests in flight that run on adapter `lora_name`."""
        with self._lock:
            return sum(1 for s in self._streams.values() if s.lora_name == lora_name)

    def abort(self, rid: int) -> None:
        if rid in self._streams:
            self._send(AbortMsg(rid))

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def dispatch(self, events: list[SchedulerOutput]) -> list[SchedulerOutput]:
        """Route one step's token events to their streams; returns the other events."""
        news: dict[int, RequestStream] = {}
        others: list[SchedulerOutput] = []
        streams = self._streams
        with self._lock:
            for event in events:
                if isinstance(event, TokenBatch):
                    self._add_tokens(event, news)
                elif isinstance(event, TokenEvent):
                    entry = streams.get(event.rid)
                    if entry is None:
                        continue  # finished already (a stop string), or never ours
                    entry.on_event(event)
                    if event.finish_reason is not None:
                        del streams[event.rid]
                        news[event.rid] = entry
                else:
                    others.append(event)
            ready = [entry for entry in news.values() if entry.worth_delivering]
        for entry in ready:
            self._deliver(entry)
        return others

    def _add_tokens(self, batch: TokenBatch, news: dict[int, RequestStream]) -> None:
        streams = self._streams
        logprobs = batch.logprobs
        for i, (rid, token) in enumerate(zip(batch.rids, batch.tokens)):
            entry = streams.get(rid)
            if entry is None:
                continue
            entry.ids.append(token)
            if logprobs is not None and not math.isnan(logprobs[i]):
                entry.logprobs.append(logprobs[i])
            if batch.top is not None and batch.top[i] is not None:
                entry.top.append(batch.top[i])
            news[rid] = entry

    def take(self, stream: RequestStream) -> StreamOutput | None:
        """Everything the stream received since its last output, as one output (None: nothing
        new). A stop string ends the request and aborts it in the scheduler."""
        with self._lock:
            if stream.finished or (not stream.ids and stream.end is None):
                return None
            ids, logprobs, top, end, start = stream.ids, stream.logprobs, stream.top, stream.end, stream.start
            stream.ids, stream.logprobs, stream.top, stream.start = [], [], [], None
            stream.finished = end is not None
        out = stream.build_output(ids, logprobs, end, top, start)
        if out.finished and end is None:  # a stop string hit, or this request failed on our side
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
            for entry in streams:
                entry.on_event(TokenEvent(entry.rid, [], FinishReason.ERROR, error=message, error_kind=kind))
        for entry in streams:
            self._deliver(entry)

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
