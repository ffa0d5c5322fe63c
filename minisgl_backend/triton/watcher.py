"""The watcher thread: cancellation, engine death, gauges and the metrics recorded by requests.

Every `cancel_poll_interval_ms` it polls the live requests for cancellation (gRPC
stop_stream(cancel_requests=True), a client that disconnected) and aborts them in the engine; a
cancelled request the engine never confirms gets its CANCELLED final after `cancel_grace_s`. It
notices a dead engine and unloads the model, and every `stats_interval_ms` it refreshes the
gauges and sends what finished requests recorded.

Threading rules of the Python-backend stub (with those in sender.py):
* `is_cancelled()` on a sender whose FINAL response went out is a use-after-free in the backend
  (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled): `final_sent` is checked under the IPC
  lock, right before the call;
* a metric update that reaches the backend while the model unloads deadlocks the unload (the
  server then exits on its exit timeout and leaves the stub behind): stub calls happen only while
  a request is in flight (Triton waits for those before unloading), and the gauges are set only
  when their value changes, so an idle server makes no stub call at all; nor does a model that is
  still loading: the gauges are first set once `execute` has run (`serving`);
* each counter and histogram value sent is a round trip to tritonserver, so they leave a request's
  own path and go in chunks, each under the IPC lock, with a pause between chunks for a waiting
  send or execute() (the lock is not fair: the watcher would take it straight back).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

from minisgl_backend.config import AdapterConfig
from minisgl_backend.triton.responses import error_reply
from minisgl_backend.triton.sender import ResponseSender, StubLock

logger = logging.getLogger("minisgl.triton")

# histogram values sent per hold of the IPC lock, and the pause between two such chunks
FLUSH_CHUNK = 16
FLUSH_PAUSE_S = 0.001


class Watcher:
    def __init__(self, pb: Any, stub_lock: StubLock, replies: ResponseSender, fe: Any, settings: AdapterConfig,
                 model_name: str) -> None:
        self.pb, self.stub_lock, self.replies, self.fe = pb, stub_lock, replies, fe
        self.model_name = model_name
        self.cancel_poll_s = settings.cancel_poll_interval_ms / 1000.0
        self.stats_interval_s = settings.stats_interval_ms / 1000.0
        self.cancel_grace_s = settings.cancel_grace_s
        self._engine_down_reported = False
        self._metrics_flushed_at = 0.0
        self.serving = threading.Event()  # set by the first execute(): the model is loaded
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="minisgl-triton-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        last_stats = 0.0
        while not self._stop.wait(self.cancel_poll_s):
            try:
                if not self._engine_down_reported and not self.fe.is_healthy():
                    self._engine_down_reported = True
                    self._report_engine_down()
                self._poll_cancellations()
                now = time.monotonic()
                self._flush_metrics(now)
                stats = self.fe.stats()
                if now - last_stats >= self.stats_interval_s and stats is not None and self.serving.is_set():
                    last_stats = now
                    self.replies.metric("update_stats", stats)
            except Exception:
                logger.exception("watcher iteration failed")

    # ------------------------------------------------------------ cancellation

    def _poll_cancellations(self) -> None:
        now = time.monotonic()
        for live in self.replies.in_flight():
            if live.rid is None or live.final_sent:
                continue
            if live.cancel_requested_at is None:
                with self.stub_lock:
                    if live.final_sent:  # under the lock: is_cancelled() after the FINAL is a use-after-free
                        continue
                    cancelled = live.sender.is_cancelled()
                if cancelled:
                    live.cancel_requested_at = now
                    logger.info("request %d cancelled by the client", live.rid)
                    self.fe.abort(live.rid)
            elif now - live.cancel_requested_at > self.cancel_grace_s:
                # the engine never confirmed the abort: end the request here
                with live.lock:
                    self.replies.forget(live)
                    self.replies.send(live, error_reply("CANCELLED", "the request was cancelled"))

    # ------------------------------------------------------------ engine death

    def _report_engine_down(self) -> None:
        """A scheduler process died: take the model out of service so readiness says so.

        Triton's Python backend has no call that marks a model not ready; unloading itself
        (possible when the server runs with --model-control-mode=explicit) does. In the other
        modes the model stays READY and answers every request with UNAVAILABLE.
        """
        logger.error("the engine is down: every request now gets UNAVAILABLE; unloading the model")
        threading.Thread(target=self._unload_self, name="minisgl-unload", daemon=True).start()

    def _unload_self(self) -> None:
        try:
            self.pb.unload_model(self.model_name)
        except Exception as exc:
            logger.error("could not unload the model (%s): it stays READY but cannot serve; "
                         "run tritonserver with --model-control-mode=explicit to have it unloaded, "
                         "or reload it", exc)

    # ------------------------------------------------------------ metrics

    def _flush_metrics(self, now: float) -> None:
        """Send what finished requests recorded, every stats interval, in chunks and only while a
        request is in flight; when the last request ends, `ResponseSender.on_output` sends the
        rest before its FINAL."""
        metrics = self.replies.metrics
        if now - self._metrics_flushed_at < self.stats_interval_s or metrics is None:
            return
        self._metrics_flushed_at = now
        for chunk in itertools.count():
            if chunk:
                time.sleep(FLUSH_PAUSE_S)  # a waiting send or execute() gets the lock first
            with self.stub_lock:
                if self.replies.idle():
                    return
                try:
                    more = metrics.flush(FLUSH_CHUNK)
                except Exception:
                    logger.exception("metrics flush failed")
                    return
            if not more:
                return
