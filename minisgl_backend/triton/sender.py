"""Streaming responses back: the stub's IPC lock, the table of live requests and the sender thread.

The frontend's receiver thread sends a request's first tokens at once and queues every other
stream with news (`on_news`). The sender thread turns a queued stream's news into one response
with every id that arrived since its last one (a sender that falls behind sends fewer, larger
responses: no client waits on a backlog), in rounds, resting after each as long as it took: under
load the serving layer keeps to a share of the CPU. A request's end does not wait (`_pause`).

Threading rules of the Python-backend stub (Triton 24.10, as in nvidia-pytriton 0.7.0):
* every call into the stub (`send`, `is_cancelled`, metric updates, and `execute` as a whole)
  holds the IPC lock (`StubLock`): a metric update racing with a response sent from another
  thread crashes tritonserver (SIGSEGV / boost::interprocess::lock_exception in
  libtriton_python.so);
* the lock is not fair, so a thread other than execute()'s lets an execute() that waits for it
  go first (for at most `EXECUTE_FIRST_MAX_S`): behind a sender going from send to send, new
  requests would wait while the engine runs fewer of them;
* a request's `final_sent` is set before its FINAL takes the lock, and the watcher reads it under
  the lock: a sender whose FINAL went out must never be polled (see watcher.py).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

from minisgl_backend.messages import FinishReason
from minisgl_backend.router import deliver_to
from minisgl_backend.triton.parsing import ParsedRequest
from minisgl_backend.triton.responses import Reply, ResponseAssembler

logger = logging.getLogger("minisgl.triton")

# the longest a stub call from another thread waits for an execute() to get the IPC lock first
EXECUTE_FIRST_MAX_S = 0.005


class StubLock:
    """The IPC lock around every call into the stub. execute() holds it with `for_execute()`;
    every other thread with `with stub_lock:`, which first lets a waiting execute() have it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._no_execute_waiting = threading.Event()
        self._no_execute_waiting.set()

    @property
    def execute_waiting(self) -> bool:
        return not self._no_execute_waiting.is_set()

    @contextlib.contextmanager
    def for_execute(self) -> Iterator[None]:
        self._no_execute_waiting.clear()  # the other threads' stub calls step aside
        with self.lock:
            self._no_execute_waiting.set()
            yield

    def __enter__(self) -> "StubLock":
        self._no_execute_waiting.wait(EXECUTE_FIRST_MAX_S)
        self.lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()


@dataclass(eq=False)
class LiveRequest:
    sender: Any  # the request's pb response sender
    request: ParsedRequest
    assembler: ResponseAssembler
    arrival: float
    rid: int | None = None
    first_token_at: float | None = None
    cancel_requested_at: float | None = None
    final_sent: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class ResponseSender:
    """The requests in flight and everything that answers them: `on_news` (the receiver thread),
    the sender thread, `on_output` (a request's consumer) and `send` (a Reply to the stub)."""

    def __init__(self, pb: Any, stub_lock: StubLock) -> None:
        self.pb, self.stub_lock = pb, stub_lock
        self.fe: Any = None  # the Frontend and the EngineMetrics, set before the thread starts
        self.metrics: Any = None
        self._live: dict[int, LiveRequest] = {}
        self._live_lock = threading.Lock()
        self._ready: collections.deque = collections.deque()  # streams with news
        self._wake = threading.Event()
        self._urgent_news = threading.Event()  # a request's end was queued: the pause ends
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, live: LiveRequest) -> None:
        with self._live_lock:
            self._live[id(live)] = live

    def forget(self, live: LiveRequest) -> None:
        with self._live_lock:
            self._live.pop(id(live), None)

    def in_flight(self) -> list[LiveRequest]:
        with self._live_lock:
            return list(self._live.values())

    def idle(self) -> bool:
        with self._live_lock:
            return not self._live

    def drain(self) -> list[LiveRequest]:
        with self._live_lock:
            leftovers, self._live = list(self._live.values()), {}
        return leftovers

    # ------------------------------------------------------------ the sender thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="minisgl-triton-send", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        self._wake.set()
        self._urgent_news.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def on_news(self, stream: Any) -> None:
        """The receiver thread: a request's first tokens go out from here at once (no round to
        wait for, so even a request that ends a few steps later streams); other news queues the
        stream (once at a time), a request's end at the front."""
        if stream.queued:
            return
        if stream.num_output_tokens == 0 and stream.end is None:
            self._send_news(stream)
            return
        stream.queued = True
        if stream.end is not None:
            self._ready.appendleft(stream)
            self._urgent_news.set()
        else:
            self._ready.append(stream)
        self._wake.set()

    def _run(self) -> None:
        """Rounds: every stream queued at the start of a round gets one response with all its news;
        after a round that took t the sender rests for t."""
        ready = self._ready
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            while ready:
                started = time.monotonic()
                for _ in range(len(ready)):
                    self._send_news(ready.popleft())
                self._pause(time.monotonic() - started)
            if self._stop.is_set():
                return

    def _pause(self, seconds: float) -> None:
        """The rest between rounds. The streams that ended (queued at the front) go out at once,
        so their clients send their next requests; the others keep gathering ids for the next
        round (ending the whole pause early would make rounds as frequent as requests end, and
        so responses smaller and costlier per token)."""
        deadline = time.monotonic() + seconds
        ready = self._ready
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or not self._urgent_news.wait(left):
                return
            self._urgent_news.clear()
            while ready and ready[0].end is not None:
                self._send_news(ready.popleft())

    def _send_news(self, stream: Any) -> None:
        stream.queued = False
        try:
            out = self.fe.take(stream)
            if out is not None:
                deliver_to(stream, out)
        except Exception:
            logger.exception("sending the output of request %d failed", stream.rid)

    # ------------------------------------------------------------ a request's outputs

    def on_output(self, live: LiveRequest, out: Any) -> None:
        """A request's consumer: its metrics recorded (sent later by the watcher, or here before
        the FINAL of the last request in flight) and its replies sent."""
        now = time.monotonic()
        with live.lock:
            if live.first_token_at is None and out.token_ids:
                live.first_token_at = now
                self.metric("on_first_token", now - live.arrival, out.queue_time, stub_call=False)
            replies = live.assembler.on_output(out)
            if out.finished:
                self.forget(live)
                reason = out.finish_reason or FinishReason.STOP
                ttft = None if live.first_token_at is None else live.first_token_at - live.arrival
                self.metric("on_finish", reason, out.num_input_tokens, out.num_output_tokens, out.cached_tokens,
                            now - live.arrival, ttft, stub_call=False)
                if self.idle():  # the last request in flight: everything out before its FINAL
                    self.metric("flush")
            for reply in replies:
                self.send(live, reply)

    def metric(self, method: str, *args: Any, stub_call: bool = True) -> None:
        """`EngineMetrics.<method>(*args)`; under the IPC lock unless it only records a request's
        values (`stub_call=False`: on_first_token, on_finish), which the watcher sends."""
        if self.metrics is None:
            return
        try:
            with self.stub_lock if stub_call else contextlib.nullcontext():
                getattr(self.metrics, method)(*args)
        except Exception:
            logger.exception("metrics update %s failed", method)

    def send(self, live: LiveRequest, reply: Reply) -> None:
        """At most one FINAL per request, nothing after it. `final_sent` is set before the send
        takes the IPC lock: the watcher reads it under that lock and so never polls a sender
        whose FINAL is (being) sent."""
        if live.final_sent:
            return
        if reply.final:
            live.final_sent = True
        self.send_raw(live.sender, reply)

    def send_raw(self, sender: Any, reply: Reply) -> None:
        pb = self.pb
        try:
            if reply.outputs is None:
                code = getattr(pb.TritonError, reply.error_code or "INTERNAL", None)
                error = pb.TritonError(reply.error_message, code) if code is not None else pb.TritonError(
                    reply.error_message)
                response = pb.InferenceResponse(output_tensors=[], error=error)
            else:
                response = pb.InferenceResponse(
                    output_tensors=[pb.Tensor(name, value) for name, value in reply.outputs.items()])
            flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if reply.final else 0
            with self.stub_lock:
                sender.send(response, flags=flags)
        except Exception:  # the client may be gone; never let it escape into the engine's thread
            logger.warning("could not send a response: %s", traceback.format_exc(limit=3))
