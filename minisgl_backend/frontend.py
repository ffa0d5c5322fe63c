"""The frontend: tokenize, submit to the rank-0 scheduler over ZMQ, detokenize, stream back.

`RequestStream` turns the scheduler's per-token events for one request into `StreamOutput`s
(incremental text, stop strings); the offline `LLM` and the Triton model both use it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from minisgl_backend.config import EngineConfig
from minisgl_backend.messages import AbortMsg, ErrorEvent, ErrorKind, FinishReason, StatsEvent, TokenEvent, UserMsg
from minisgl_backend.sampling_params import SamplingParams
from minisgl_backend.detokenizer import IncrementalDetokenizer
from minisgl_backend.launch import SchedulerProcesses

logger = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """The request cannot be served as sent; the message says what to change."""


@dataclass
class StreamOutput:
    rid: int
    text: str  # new text since the previous output
    token_ids: list[int]  # new ids since the previous output
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0  # cumulative
    logprobs: list[float] | None = None
    cached_tokens: int = 0
    queue_time: float = 0.0
    error_kind: str | None = None  # an ErrorKind value when `error` is set


class RequestStream:
    """Per-request state on the frontend side: detokenizer, stop strings, counters."""

    def __init__(self, rid: int, tokenizer: Any, input_ids: list[int], params: SamplingParams) -> None:
        self.rid = rid
        self.num_input_tokens = len(input_ids)
        self.detok = IncrementalDetokenizer(tokenizer, input_ids, params.stop)
        self.num_output_tokens = 0
        self.cached_tokens = 0
        self.queue_time = 0.0
        self.finished = False
        self.stop_hit = False  # a stop string ended the request: the scheduler must abort it

    def on_event(self, event: TokenEvent) -> StreamOutput | None:
        if self.finished:
            return None  # tokens after a stop string, or the abort that followed it
        if self.num_output_tokens == 0:
            self.cached_tokens, self.queue_time = event.cached_tokens, event.queue_time
        self.num_output_tokens += len(event.token_ids)
        step = self.detok.feed(event.token_ids) if event.token_ids else None
        text = step.text if step is not None else ""
        reason = event.finish_reason
        if step is not None and step.stopped:
            reason, self.stop_hit = FinishReason.STOP.value, True
        elif reason is not None and reason != FinishReason.ERROR.value:
            text += self.detok.flush()
        self.finished = reason is not None
        return StreamOutput(self.rid, text, list(event.token_ids), self.finished, reason, event.error,
                            self.num_input_tokens, self.num_output_tokens, event.logprobs,
                            self.cached_tokens, self.queue_time, event.error_kind)


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


class Frontend:
    """Owns the scheduler processes (one per TP rank) and the streams of in-flight requests."""

    def __init__(self, config: EngineConfig) -> None:
        from minisgl_backend.tokenizer import load_tokenizer

        self.config = config
        self.tokenizer = load_tokenizer(config.model.model_path)
        self._procs = SchedulerProcesses(config)
        self.info = self._procs.start()  # context_len, vocab_size, num_pages ... from rank 0
        self.context_len: int = self.info["context_len"]
        self._streams: dict[int, tuple[RequestStream, Callable[[StreamOutput], None]]] = {}
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._stats: dict[str, int] = {}
        self._healthy = True
        self._closed = False
        self._receiver = threading.Thread(target=self._receive_loop, name="minisgl-frontend-recv", daemon=True)
        self._receiver.start()

    # ------------------------------------------------------------ public API

    def submit(self, prompt: str | list[int], params: SamplingParams,
               callback: Callable[[StreamOutput], None]) -> int:
        input_ids = tokenize_prompt(self.tokenizer, prompt)
        self.check_prompt(input_ids)
        rid = next(self._rids)
        stream = RequestStream(rid, self.tokenizer, input_ids, params)
        with self._lock:  # the same lock as _on_engine_death: a stream is either failed or never added
            if not self._healthy:
                raise RuntimeError("the engine is not running (a scheduler process died); reload the model")
            self._streams[rid] = (stream, callback)
        try:
            self._procs.send(UserMsg(rid, input_ids, params, time.monotonic()))
        except Exception:
            with self._lock:
                self._streams.pop(rid, None)
            raise
        return rid

    def check_prompt(self, input_ids: list[int]) -> None:
        check_prompt(input_ids, self.context_len)

    def abort(self, rid: int) -> None:
        if rid in self._streams:
            self._procs.send(AbortMsg(rid))

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def is_healthy(self) -> bool:
        return self._healthy and not self._closed

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True  # first: the receiver must not mistake the stop for a crash
        self._receiver.join(timeout=5)
        self._procs.stop()
        self._procs.close()
        self._fail_all("the server is shutting down")

    # ------------------------------------------------------------ receiving

    def _receive_loop(self) -> None:
        while not self._closed:
            events = self._procs.recv(timeout_ms=100)
            for event in events:
                self._dispatch(event)
            if not events and not self._closed and not self._procs.all_alive():
                self._on_engine_death(f"a scheduler process died (exit codes {self._procs.exit_codes()})")
                return

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, TokenEvent):
            self._on_token_event(event)
        elif isinstance(event, StatsEvent):
            self._stats = {f: getattr(event, f) for f in event.__struct_fields__}
        elif isinstance(event, ErrorEvent):
            self._on_engine_death(event.message)

    def _on_token_event(self, event: TokenEvent) -> None:
        entry = self._streams.get(event.rid)
        if entry is None:
            return
        stream, callback = entry
        out = stream.on_event(event)
        if out is None:
            return
        if out.finished:
            with self._lock:
                self._streams.pop(event.rid, None)
            if stream.stop_hit:
                self._procs.send(AbortMsg(event.rid))
        self._safe_callback(callback, out)

    def _on_engine_death(self, message: str) -> None:
        with self._lock:
            if not self._healthy:
                return
            self._healthy = False
        logger.error("engine failure: %s", message)
        self._fail_all(f"engine failure: {message}")
        self._procs.kill()

    def _fail_all(self, message: str) -> None:
        with self._lock:
            entries, self._streams = list(self._streams.values()), {}
        for stream, callback in entries:
            self._safe_callback(callback, StreamOutput(stream.rid, "", [], True, FinishReason.ERROR.value, message,
                                                       stream.num_input_tokens, stream.num_output_tokens,
                                                       error_kind=ErrorKind.ENGINE.value))

    @staticmethod
    def _safe_callback(callback: Callable[[StreamOutput], None], out: StreamOutput) -> None:
        try:
            callback(out)
        except Exception:  # a broken consumer must not stop the stream of everyone else
            logger.exception("stream callback failed for request %d", out.rid)
