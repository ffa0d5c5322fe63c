"""The Triton Python-backend adapter behind `model_repository/minisgl/1/model.py`.

`execute` parses each request, submits it to the `Frontend` and returns at once (decoupled).
The frontend's receiver thread routes each step's tokens to their streams, sends a request's
first tokens at once, and queues the other streams that have news (a request's end at the
front). One sender thread turns a queued stream's news into one response (detokenizing every
id that arrived since its last response: when the sender falls behind, responses carry more ids
each, so no client waits on a backlog) and sends it, in rounds paced by `sender_pacing`, at the
nice value `sender_nice`.
A watcher thread polls live requests for cancellation (gRPC stop_stream(cancel_requests=True),
client disconnect) and aborts them in the engine, and refreshes the gauges.

Threading rules learnt the hard way (24.10 Python backend of nvidia-pytriton 0.7.0):
* every call into the stub (`send`, `is_cancelled`, metric updates, and `execute` as a whole)
  holds `self._ipc`: metric updates racing with responses sent from another thread crash
  tritonserver (SIGSEGV / boost::interprocess::lock_exception in libtriton_python.so);
* `is_cancelled()` on a sender whose FINAL response went out is a use-after-free
  (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled): the watcher checks `final_sent`
  under the same lock;
* a metric update that reaches the backend while the model unloads deadlocks the unload
  (the server then exits on its exit timeout and leaves the stub behind): stub calls happen
  only for requests in flight (Triton waits for those before unloading), and the gauges are
  set only when their value changes, so an idle server makes no stub call at all.

The IPC lock is not fair, so an execute() that waits for it goes first (`_stub_lock`): behind a
sender going from send to send, new requests waited ~1 ms each (256 streams: 37.1k -> 42.3k
tok/s and TTFT p50 56-74 -> 25-32 ms, three alternating pairs).

`pb_utils` (the `triton_python_backend_utils` module) is passed in, so the adapter can be
driven by a fake in unit tests.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from minisgl_backend.cpu_affinity import (CoreSplit, allowed_cores, format_cpu_list, pin_process, serving_processes,
                                         split_cores)
from minisgl_backend.messages import FinishReason
from minisgl_backend.processes import freeze_startup_objects
from minisgl_backend.router import deliver_to
from minisgl_backend.triton.contract import ADAPTER_PARAMETERS, INPUTS, MODEL_PATH_ENV, OUTPUTS
from minisgl_backend.triton.metrics import EngineMetrics
from minisgl_backend.triton.parsing import ParsedRequest, RequestError, parse_request
from minisgl_backend.triton.responses import Reply, ResponseAssembler, error_reply
from minisgl_backend.triton.stub_check import stub_numpy_problem

logger = logging.getLogger("minisgl.triton")

# the longest a stub call from another thread waits for an execute() to get the IPC lock first
_EXECUTE_FIRST_MAX_S = 0.005
# histogram values sent per hold of the IPC lock by the watcher (each a round trip to tritonserver,
# ~25 us when sent in a row): sends and execute() wait at most this long for it, and between
# two chunks the watcher pauses (a lock is not fair: it would take it straight back)
_FLUSH_CHUNK = 16
_FLUSH_PAUSE_S = 0.001

DEFAULT_MODEL_SUBDIR = os.path.join("build", "models", "smollm2")


def repo_root_of(path: str | os.PathLike) -> Path | None:
    """The source checkout holding `path` (a folder with minisgl_backend/ and model_repository/)."""
    for parent in Path(path).resolve().parents:
        if (parent / "minisgl_backend" / "__init__.py").is_file() and (parent / "model_repository").is_dir():
            return parent
    return None


def resolve_model_path(configured: str, model_file: str | None) -> str:
    """config.pbtxt's model_path, else $MINISGL_MODEL_PATH, else <checkout>/build/models/smollm2."""
    if configured:
        return configured
    from_env = os.environ.get(MODEL_PATH_ENV, "")
    if from_env:
        return from_env
    root = repo_root_of(model_file) if model_file else None
    if root is not None and (root / DEFAULT_MODEL_SUBDIR).is_dir():
        return str(root / DEFAULT_MODEL_SUBDIR)
    raise ValueError(
        "no model: set the model_path parameter in config.pbtxt, or the environment variable "
        f"{MODEL_PATH_ENV}, or run 'make model' to prepare the default model in {DEFAULT_MODEL_SUBDIR}")


def split_parameters(model_config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """config.pbtxt parameters -> (engine settings, adapter settings); empty values mean 'default'."""
    engine, adapter = {}, dict(ADAPTER_PARAMETERS)
    for key, value in (model_config.get("parameters") or {}).items():
        text = value.get("string_value", "") if isinstance(value, dict) else str(value)
        if key in ADAPTER_PARAMETERS:
            if text != "":
                adapter[key] = text
        elif key.isupper():  # Python-backend settings such as EXECUTION_ENV_PATH
            continue
        elif text != "" or key == "model_path":
            engine[key] = text
    return engine, adapter


def serving_cpu_threads(tp_size: int) -> int:
    """Torch threads per scheduler rank on CPU under Triton: one core stays with tritonserver and
    this stub. On 2 cores, two engine threads made every step wait for the one the serving layer
    had preempted: 10.7k -> 16.2k tokens/s at 64 streams with one (benchmarks/serving_overhead.py)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, (cores - 1) // tp_size)


@dataclass(eq=False)
class _Live:
    sender: Any
    request: ParsedRequest
    assembler: ResponseAssembler
    arrival: float
    rid: int | None = None
    first_token_at: float | None = None
    cancel_requested_at: float | None = None
    final_sent: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class TritonAdapter:
    def __init__(self, pb_utils: Any, model_file: str | None = None) -> None:
        self.pb = pb_utils
        self.model_file = model_file
        self.fe: Any = None
        self.metrics: EngineMetrics | None = None
        self.vocab_size: int | None = None
        self._ipc = threading.RLock()
        self._no_execute_waiting = threading.Event()
        self._no_execute_waiting.set()
        self._live: dict[int, _Live] = {}
        self._live_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._ready: collections.deque = collections.deque()  # streams with news, for the sender
        self._wake = threading.Event()
        self._sender_stop = threading.Event()
        self._sender: threading.Thread | None = None
        self._finalized = False
        self._metrics_flushed_at = 0.0
        self.sender_nice = 0
        self.sender_pacing = 0.0
        self._urgent_news = threading.Event()  # a request's end was queued: the sender's pause ends
        self.stats_interval_s = 0.5
        self._engine_down_reported = False
        self.model_name = "minisgl"

    # ------------------------------------------------------------ model config

    @staticmethod
    def auto_complete_config(cfg: Any, pb_utils: Any) -> Any:
        """Fill in the tensor contract and the decoupled policy where config.pbtxt lacks them."""
        current = cfg.as_dict()
        have_inputs = {i["name"] for i in current.get("input", [])}
        have_outputs = {o["name"] for o in current.get("output", [])}
        for spec in INPUTS:
            if spec.name not in have_inputs:
                cfg.add_input(spec.as_config())
        for spec in OUTPUTS:
            if spec.name not in have_outputs:
                cfg.add_output({k: v for k, v in spec.as_config().items() if k != "optional"})
        cfg.set_max_batch_size(0)
        cfg.set_model_transaction_policy({"decoupled": True})
        return cfg

    # ------------------------------------------------------------ life cycle

    def initialize(self, args: dict) -> None:
        from minisgl_backend.config import EngineConfig
        from minisgl_backend.frontend import Frontend

        logging.basicConfig(level=os.environ.get("MINISGL_LOG_LEVEL", "INFO"),
                            format="[minisgl] %(levelname)s %(name)s: %(message)s")
        problem = stub_numpy_problem(self.pb)
        if problem:
            raise RuntimeError(problem)
        model_config = json.loads(args["model_config"])
        if not self.pb.using_decoupled_model_transaction_policy(model_config):
            raise ValueError("the minisgl model streams: set model_transaction_policy { decoupled: true }")
        engine, adapter = split_parameters(model_config)
        engine["model_path"] = resolve_model_path(engine.get("model_path", ""), self.model_file)
        self.cancel_poll_s = float(adapter["cancel_poll_interval_ms"]) / 1000.0
        self.stats_interval_s = float(adapter["stats_interval_ms"]) / 1000.0
        self.cancel_grace_s = float(adapter["cancel_grace_s"])
        self.sender_pacing = float(adapter["sender_pacing"])
        if not 0 <= self.sender_pacing <= 100:
            raise ValueError(f"sender_pacing must be in [0, 100], got {self.sender_pacing}")
        self.sender_nice = int(adapter["sender_nice"])
        if not 0 <= self.sender_nice <= 19:
            raise ValueError(f"sender_nice must be in [0, 19], got {self.sender_nice}")
        config = EngineConfig.from_flat(engine)
        if config.parallel.cpu_threads == 0:
            config.parallel.cpu_threads = serving_cpu_threads(config.parallel.tp_size)
        split = self._core_split(adapter["cpu_affinity"], config)
        if split is not None:
            config.parallel.cpu_cores = format_cpu_list(split.engine)
        logger.info("starting engine: %s", config.to_flat())
        self.fe = Frontend(config, deliver=self._on_news)
        if split is not None:
            for pid in serving_processes():
                pin_process(pid, split.serving)
            logger.info("engine on cores %s, tritonserver and this stub on %s", config.parallel.cpu_cores,
                        format_cpu_list(split.serving))
        self.vocab_size = self.fe.info.vocab_size
        self.model_name = args.get("model_name", self.model_name)
        self.metrics = EngineMetrics(self.pb, self.model_name, args.get("model_version", "1"))
        freeze_startup_objects()
        self.start_threads()
        logger.info("engine ready (context %d tokens)", self.fe.context_len)

    @staticmethod
    def _core_split(setting: str, config: Any) -> CoreSplit | None:
        """Where the engine and the serving layer run (`cpu_affinity`): apart, for an engine on
        the CPU inside a real tritonserver with a core to spare; None: where the OS puts them."""
        if setting not in ("auto", "off"):
            raise ValueError(f"cpu_affinity must be auto or off, got {setting!r}")
        if setting == "off" or config.device != "cpu" or not serving_processes():
            return None
        engine_cores = config.parallel.cpu_threads * config.parallel.tp_size
        return split_cores(allowed_cores(), config.parallel.cpu_cores, engine_cores)

    def start_threads(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="minisgl-triton-watch", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="minisgl-triton-send", daemon=True)
        self._watcher.start()
        self._sender.start()

    def finalize(self) -> None:
        if self._finalized:
            return
        self._finalized = True
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        if self.fe is not None:
            try:
                self.fe.shutdown()  # fails what is still in flight through the sender
            except Exception:
                logger.exception("frontend shutdown failed")
        self._sender_stop.set()
        self._wake.set()
        self._urgent_news.set()
        if self._sender is not None:
            self._sender.join(timeout=10)
        with self._live_lock:
            leftovers, self._live = list(self._live.values()), {}
        for live in leftovers:
            self._send(live, error_reply("UNAVAILABLE", "the model is being unloaded"))
        if self.metrics is not None and self._ipc.acquire(timeout=5):
            try:
                self.metrics.close()
            finally:
                self._ipc.release()
        self.metrics = None

    # ------------------------------------------------------------ requests

    def execute(self, requests: list) -> None:
        self._no_execute_waiting.clear()  # the other threads' stub calls step aside (`_stub_lock`)
        with self._ipc:  # no send / poll / metric update from another thread while execute runs
            self._no_execute_waiting.set()
            self._execute(requests)
        return None

    def _stub_lock(self) -> threading.RLock:
        """The IPC lock, for a stub call from a thread other than execute()'s: first lets an
        execute() that waits for the lock have it. A lock is not fair: a sender going from send
        to send would take it straight back, while new requests wait for the engine (their
        clients' next requests at high concurrency, so the engine runs fewer of them)."""
        self._no_execute_waiting.wait(_EXECUTE_FIRST_MAX_S)
        return self._ipc

    def _execute(self, requests: list) -> None:
        for request in requests:
            try:
                self._start(request)
            except Exception as exc:  # nothing a client sends may take the model down
                logger.error("request failed before submission: %s", traceback.format_exc())
                try:
                    sender = request.get_response_sender()
                    self._send_raw(sender, error_reply("INTERNAL", f"{type(exc).__name__}: {exc}"))
                except Exception:
                    logger.exception("could not answer a failed request")

    def _start(self, request: Any) -> None:
        sender = request.get_response_sender()
        arrival = time.monotonic()
        try:
            parsed = parse_request(partial(self._input, request), _parameters_of(request), self.vocab_size)
        except RequestError as exc:
            self._reject(sender, "INVALID_ARG", str(exc))
            return
        if not self.fe.is_healthy():
            self._reject(sender, "UNAVAILABLE", "the engine is not running (a scheduler process died); "
                                                "reload the model or restart the server", invalid=False)
            return
        live = _Live(sender, parsed, ResponseAssembler(parsed, self._prompt_echo(parsed)), arrival)
        with self._live_lock:
            self._live[id(live)] = live
        try:
            live.rid = self.fe.submit(parsed.prompt, parsed.params, partial(self._on_output, live),
                                      stream=parsed.stream)
        except ValueError as exc:  # InvalidRequest among them
            self._forget(live)
            self._reject(sender, "INVALID_ARG", str(exc))
        except RuntimeError as exc:
            self._forget(live)
            self._reject(sender, "UNAVAILABLE", str(exc), invalid=False)
        except Exception:
            self._forget(live)  # never left behind to get a second FINAL from _fail_all
            raise

    def _input(self, request: Any, name: str) -> Any:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        try:
            return tensor.as_numpy()
        except Exception as exc:
            raise RequestError(f"input {name!r} could not be decoded ({type(exc).__name__}: {exc}); a STRING "
                               "tensor must hold elements each prefixed by its 4-byte little-endian length")

    def _prompt_echo(self, parsed: ParsedRequest) -> str:
        if parsed.stream or parsed.exclude_input_in_output:
            return ""
        if isinstance(parsed.prompt, str):
            return parsed.prompt
        if parsed.prompt_text is not None:
            return parsed.prompt_text
        try:
            return self.fe.tokenizer.decode(parsed.prompt, skip_special_tokens=True)
        except Exception:
            return ""

    def _reject(self, sender: Any, code: str, message: str, invalid: bool = True) -> None:
        if invalid and self.metrics is not None:
            with self._ipc:  # execute()'s thread (it holds the lock already)
                self.metrics.on_invalid()
        self._send_raw(sender, error_reply(code, message))

    def _forget(self, live: _Live) -> None:
        with self._live_lock:
            self._live.pop(id(live), None)

    # ------------------------------------------------------------ streaming back (sender thread)

    def _on_news(self, stream: Any) -> None:
        """The receiver thread: a request's first tokens are sent from here at once (TTFT; no
        round of the sender to wait for, so even a request that ends a few steps later streams);
        other news queues the stream for the sender (once at a time), a request's end at the
        front, sent during the sender's pause (its client sends the next request)."""
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

    def _send_loop(self) -> None:
        """Rounds: every stream queued at the start of a round gets one response with all its news.
        After a round that took t, the next waits `sender_pacing` * t (requests that end meanwhile
        go out at once, see `_pause`): at low load rounds take microseconds and nothing changes;
        when sends pile up, the sender keeps to a share of the CPU and each response carries the
        ids of more steps."""
        if self.sender_nice:  # this thread only: execute() and the receiver keep their priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.sender_nice)
        ready = self._ready
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            while ready:
                started = time.monotonic()
                for _ in range(len(ready)):
                    self._send_news(ready.popleft())
                self._pause((time.monotonic() - started) * self.sender_pacing)
            if self._sender_stop.is_set():
                return

    def _pause(self, seconds: float) -> None:
        """The sender's pause between rounds. A request's end does not wait for it: the streams
        that ended (queued at the front) go out at once, so their clients send their next requests,
        while the others keep gathering ids for the next round (ending the whole pause early made
        rounds as frequent as requests end, and so responses smaller and costlier per token)."""
        deadline = time.monotonic() + seconds
        ready = self._ready
        while not self._sender_stop.is_set():
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

    def _on_output(self, live: _Live, out: Any) -> None:
        now = time.monotonic()
        with live.lock:
            if live.first_token_at is None and out.token_ids:
                live.first_token_at = now
                self._metric("on_first_token", now - live.arrival, out.queue_time, stub_call=False)
            replies = live.assembler.on_output(out)
            if out.finished:
                self._forget(live)
                reason = out.finish_reason or FinishReason.STOP
                ttft = None if live.first_token_at is None else live.first_token_at - live.arrival
                self._metric("on_finish", reason, out.num_input_tokens, out.num_output_tokens, out.cached_tokens,
                             now - live.arrival, ttft, stub_call=False)
                if not self._live:  # the last request in flight: everything out before its FINAL
                    self._metric("flush")
            for reply in replies:
                self._send(live, reply)

    def _flush_metrics(self, now: float) -> None:
        """The watcher sends what finished requests recorded, every stats interval: each counter and
        histogram value is a round trip to tritonserver, so they leave a request's own path (its
        first token, its FINAL). In chunks, each under the IPC lock and only while a request is in
        flight (a stub call is only safe then, see the module docstring); when the last request
        ends, `_on_output` sends the rest before its FINAL."""
        if now - self._metrics_flushed_at < self.stats_interval_s or self.metrics is None:
            return
        self._metrics_flushed_at = now
        for chunk in itertools.count():
            if chunk:
                time.sleep(_FLUSH_PAUSE_S)  # a waiting send or execute() gets the lock first
            with self._stub_lock():
                with self._live_lock:
                    if not self._live:
                        return
                try:
                    more = self.metrics.flush(_FLUSH_CHUNK)
                except Exception:
                    logger.exception("metrics flush failed")
                    return
            if not more:
                return

    def _metric(self, method: str, *args: Any, stub_call: bool = True) -> None:
        """`EngineMetrics.<method>(*args)`; under the IPC lock unless it only records a request's
        values (`stub_call=False`: on_first_token, on_finish), which `_flush_metrics` sends."""
        if self.metrics is None:
            return
        try:
            with self._stub_lock() if stub_call else contextlib.nullcontext():
                getattr(self.metrics, method)(*args)
        except Exception:
            logger.exception("metrics update %s failed", method)

    def _send(self, live: _Live, reply: Reply) -> None:
        # final_sent is set before the send takes the IPC lock: the watcher reads it under
        # that lock and so never polls a sender whose FINAL response is (being) sent
        if live.final_sent:
            return
        if reply.final:
            live.final_sent = True
        self._send_raw(live.sender, reply)

    def _send_raw(self, sender: Any, reply: Reply) -> None:
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
            with self._stub_lock():
                sender.send(response, flags=flags)
        except Exception:  # the client may be gone; never let it escape into the engine's thread
            logger.warning("could not send a response: %s", traceback.format_exc(limit=3))

    # ------------------------------------------------------------ watcher thread

    def _watch(self) -> None:
        last_stats = 0.0
        while not self._stop.wait(self.cancel_poll_s):
            try:
                if not self._engine_down_reported and self.fe is not None and not self.fe.is_healthy():
                    self._engine_down_reported = True
                    self._report_engine_down()
                self._poll_cancellations()
                now = time.monotonic()
                self._flush_metrics(now)
                stats = self.fe.stats() if self.fe is not None else None
                if now - last_stats >= self.stats_interval_s and stats is not None:
                    last_stats = now
                    self._metric("update_stats", stats)
            except Exception:
                logger.exception("watcher iteration failed")

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

    def _poll_cancellations(self) -> None:
        with self._live_lock:
            lives = list(self._live.values())
        now = time.monotonic()
        for live in lives:
            if live.rid is None or live.final_sent:
                continue
            if live.cancel_requested_at is None:
                with self._stub_lock():
                    # checked under the lock: is_cancelled() on a sender whose FINAL response
                    # went out is a use-after-free in the backend (SIGSEGV in
                    # TRITONBACKEND_ResponseFactoryIsCancelled)
                    if live.final_sent:
                        continue
                    cancelled = live.sender.is_cancelled()
                if cancelled:
                    live.cancel_requested_at = now
                    logger.info("request %d cancelled by the client", live.rid)
                    self.fe.abort(live.rid)
            elif now - live.cancel_requested_at > self.cancel_grace_s:
                # the engine never confirmed the abort: end the request ourselves
                with live.lock:
                    self._forget(live)
                    self._send(live, error_reply("CANCELLED", "the request was cancelled"))


def _parameters_of(request: Any) -> str | None:
    getter = getattr(request, "parameters", None)
    if getter is None:
        return None
    try:
        return getter()
    except Exception:
        return None
