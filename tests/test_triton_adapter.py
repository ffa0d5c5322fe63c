"""The Triton adapter driven by a fake pb_utils and a fake Frontend (no server, no engine)."""

from __future__ import annotations

import json
import struct
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from minisgl_backend.messages import FinishReason, SchedulerInfo, StatsEvent
from minisgl_backend.router import InvalidRequest, StreamOutput
from minisgl_backend.checkout import resolve_model_path
from minisgl_backend.config import AdapterConfig, ConfigError
from minisgl_backend.triton import sender as sender_module
from minisgl_backend.triton.adapter import TritonAdapter, split_parameters


class FakeError:
    INVALID_ARG, INTERNAL, CANCELLED, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "CANCELLED", "UNAVAILABLE"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class FakeMetric:
    def __init__(self):
        self.value = 0.0
        self.observed = []

    def increment(self, v):
        self.value += v

    def set(self, v):
        self.value = v

    def observe(self, v):
        self.observed.append(v)


class FakeFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    families: dict = {}

    def __init__(self, name, description, kind):
        self.name, self.metrics = name, {}
        FakeFamily.families[name] = self

    def Metric(self, labels, buckets=None):
        m = FakeMetric()
        self.metrics[tuple(sorted(labels.items()))] = m
        return m


class FakeTensor:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def as_numpy(self):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value

    @classmethod
    def from_dlpack(cls, name, source):  # the stub's accepts its own Tensors (they speak DLPack)
        return cls(name, np.array(source.as_numpy()))


class FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name: t.value for t in (output_tensors or [])}
        self.error = error


class FakeSender:
    def __init__(self):
        self.sent = []
        self.cancelled = False
        self.done = threading.Event()

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))
        if flags:
            self.done.set()

    def is_cancelled(self):
        return self.cancelled


class FakeRequest:
    def __init__(self, inputs, parameters="{}"):
        self.inputs = {k: FakeTensor(k, v) for k, v in inputs.items()}
        self._parameters = parameters
        self.sender = FakeSender()

    def get_response_sender(self):
        return self.sender

    def parameters(self):
        return self._parameters


class FakePb:
    TritonError = FakeError
    MetricFamily = FakeFamily
    Tensor = FakeTensor
    InferenceResponse = FakeResponse
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.inputs.get(name)

    @staticmethod
    def using_decoupled_model_transaction_policy(config):
        return config.get("model_transaction_policy", {}).get("decoupled", False)


class FakeFrontend:
    """Answers each request with `pieces` outputs from its own thread; abort ends it early."""

    def __init__(self, pieces=3, delay=0.0):
        self.pieces, self.delay = pieces, delay
        self.aborted = set()
        self.tokenizer = None
        self.info = SchedulerInfo(context_len=100, vocab_size=100, num_pages=10, page_size=1)
        self.context_len = 100
        self.rid = 0
        self.threads = []
        self.shut = False

    def submit(self, prompt, params, callback, stream=True):
        if prompt == "too long":
            raise InvalidRequest("the prompt has 9999 tokens: shorten it")
        self.rid += 1
        rid = self.rid

        def run():
            for i in range(self.pieces):
                time.sleep(self.delay)
                if rid in self.aborted:
                    callback(StreamOutput(rid, "", [], True, FinishReason.ABORT, None, 2, i))
                    return
                last = i == self.pieces - 1
                callback(StreamOutput(rid, f"t{i}", [i], last, FinishReason.LENGTH if last else None, None,
                                      2, i + 1))

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)
        return rid

    def abort(self, rid):
        self.aborted.add(rid)

    def stats(self):
        return StatsEvent(running=1, pending=0, total_pages=10, free_pages=5, cached_pages=3, locked_pages=2,
                          free_rows=3, total_rows=4, cache_hit_tokens=0, cache_miss_tokens=0)

    def is_healthy(self):
        return not self.shut

    def shutdown(self):
        self.shut = True


def make_adapter(fe, stats_interval_ms=10):
    adapter = TritonAdapter(FakePb)
    adapter.fe, adapter.vocab_size = fe, 100
    adapter.settings = AdapterConfig(cancel_poll_interval_ms=10, stats_interval_ms=stats_interval_ms,
                                     cancel_grace_s=0.5)
    from minisgl_backend.triton.metrics import EngineMetrics

    adapter.metrics = EngineMetrics(FakePb, "minisgl", "1")
    adapter.start_threads()
    return adapter


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def text(s):
    return np.array([s.encode() if isinstance(s, str) else s], dtype=np.object_)


def test_streaming_request_gets_all_pieces_and_one_final():
    adapter = make_adapter(FakeFrontend(pieces=3))
    req = FakeRequest({"text_input": text("hi"), "stream": np.array([True])})
    assert adapter.execute([req]) is None
    assert req.sender.done.wait(5)
    texts = [r.outputs["text_output"][0] for r, _ in req.sender.sent]
    assert texts == [b"t0", b"t1", b"t2"]
    assert [f for _, f in req.sender.sent] == [0, 0, 1]
    assert FakeFamily.families["minisgl_requests_total"].metrics[
        (("finish_reason", "length"), ("model", "minisgl"), ("version", "1"))].value >= 1
    adapter.finalize()


def test_counters_are_complete_once_the_last_request_in_flight_ends():
    """Counters are summed between flushes; none may be missing once nothing is in flight, even
    with a flush interval far longer than the run."""
    FakeFamily.families.clear()
    adapter = make_adapter(FakeFrontend(pieces=4, delay=0.002), stats_interval_ms=3_600_000)
    requests = [FakeRequest({"text_input": text(f"p{i}"), "stream": np.array([True])}) for i in range(6)]
    adapter.execute(requests)
    for req in requests:
        assert req.sender.done.wait(5)
    labels = (("model", "minisgl"), ("version", "1"))
    assert FakeFamily.families["minisgl_requests_total"].metrics[(("finish_reason", "length"),) + labels].value == 6
    assert FakeFamily.families["minisgl_generation_tokens_total"].metrics[labels].value == 6 * 4
    assert FakeFamily.families["minisgl_prompt_tokens_total"].metrics[labels].value == 6 * 2
    for histogram in ("minisgl_time_to_first_token_seconds", "minisgl_request_queue_time_seconds",
                      "minisgl_e2e_request_latency_seconds", "minisgl_time_per_output_token_seconds"):
        assert len(FakeFamily.families[histogram].metrics[labels].observed) == 6, histogram
    adapter.finalize()


def test_histogram_values_leave_in_chunks_and_none_is_lost():
    """Requests only record their values; `flush` sends counters at once and histogram values
    in chunks, keeping the rest for the next call."""
    from minisgl_backend.triton.metrics import EngineMetrics

    FakeFamily.families.clear()
    metrics = EngineMetrics(FakePb, "minisgl", "1")
    for i in range(20):
        metrics.on_first_token(0.01 * i, 0.001)
        metrics.on_finish(FinishReason.LENGTH, 3, 5, 0, 0.5, 0.01 * i)
    labels = (("model", "minisgl"), ("version", "1"))
    ttft = FakeFamily.families["minisgl_time_to_first_token_seconds"].metrics[labels]
    assert ttft.observed == [], "nothing reaches Triton on a request's own path"
    assert metrics.flush(32) is True
    assert FakeFamily.families["minisgl_generation_tokens_total"].metrics[labels].value == 100
    while metrics.flush(32):
        pass
    assert sorted(ttft.observed) == sorted(0.01 * i for i in range(20))
    tpot = FakeFamily.families["minisgl_time_per_output_token_seconds"].metrics[labels]
    assert len(tpot.observed) == 20 and metrics.flush() is False


def test_paced_sender_delivers_every_piece_and_ends_promptly():
    """Rounds with pauses between them merge pieces into fewer responses, never lose one, and a
    request's end cuts the pause short."""
    adapter = make_adapter(FakeFrontend(pieces=6, delay=0.003))
    requests = [FakeRequest({"text_input": text(f"p{i}"), "stream": np.array([True])}) for i in range(4)]
    started = time.monotonic()
    adapter.execute(requests)
    for req in requests:
        assert req.sender.done.wait(10)
        assert b"".join(r.outputs["text_output"][0] for r, _ in req.sender.sent) == b"t0t1t2t3t4t5"
        assert [f for _, f in req.sender.sent][-1] == 1 and sum(f for _, f in req.sender.sent) == 1
    assert time.monotonic() - started < 5
    adapter.finalize()


def test_a_request_end_goes_out_during_the_pause_and_the_others_wait_for_the_round():
    """The pause between rounds: an ended stream (queued at the front) is sent at once, the
    streams still generating stay queued until the pause is over (they gather more ids)."""
    replies, sent = TritonAdapter(FakePb).replies, []
    ended, running = SimpleNamespace(end="stop"), SimpleNamespace(end=None)
    replies._send_news = lambda stream: sent.append((stream, time.monotonic() - started))
    replies._ready.extend([running])

    def end_later():
        time.sleep(0.05)
        replies._ready.appendleft(ended)
        replies._urgent_news.set()

    started = time.monotonic()
    threading.Thread(target=end_later).start()
    replies._pause(0.4)
    assert time.monotonic() - started >= 0.4
    assert [stream for stream, _ in sent] == [ended] and sent[0][1] < 0.3
    assert list(replies._ready) == [running]


def test_bad_and_broken_inputs_get_one_invalid_arg_and_never_raise():
    adapter = make_adapter(FakeFrontend())
    broken = struct.error("unpack_from requires a buffer of at least 252645139 bytes")
    requests = [
        FakeRequest({"text_input": broken}),
        FakeRequest({"text_input": text(b"\xff")}),
        FakeRequest({"text_input": text("hi")}, parameters='{"max_tokens": "x"}'),
        FakeRequest({"text_input": text("too long")}),
    ]
    adapter.execute(requests)
    for req in requests:
        assert len(req.sender.sent) == 1
        response, flags = req.sender.sent[0]
        assert flags == 1 and response.error.code == "INVALID_ARG", response.error.message
    assert "4-byte" in requests[0].sender.sent[0][0].error.message
    adapter.finalize()


def test_unexpected_exception_is_answered_as_internal():
    adapter = make_adapter(FakeFrontend())

    class Weird(FakeRequest):
        def parameters(self):
            raise RuntimeError("no")

    adapter.fe.submit = lambda *a, **k: (_ for _ in ()).throw(KeyError("boom"))
    req = Weird({"text_input": text("hi")})
    adapter.execute([req])
    (response, flags), = req.sender.sent
    assert flags == 1 and response.error.code == "INTERNAL"
    adapter.finalize()


def test_cancellation_aborts_in_engine_and_ends_with_cancelled():
    fe = FakeFrontend(pieces=1000, delay=0.005)
    adapter = make_adapter(fe)
    req = FakeRequest({"text_input": text("hi"), "stream": np.array([True])})
    adapter.execute([req])
    wait_for(lambda: req.sender.sent)  # streaming
    req.sender.cancelled = True
    assert req.sender.done.wait(5)
    assert fe.aborted == {1}
    response, flags = req.sender.sent[-1]
    assert flags == 1 and response.error.code == "CANCELLED"
    adapter.finalize()


def test_cancellation_grace_when_engine_never_confirms():
    fe = FakeFrontend(pieces=1000, delay=0.005)
    fe.abort = lambda rid: None  # the engine ignores the abort
    adapter = make_adapter(fe)
    req = FakeRequest({"text_input": text("hi"), "stream": np.array([True])})
    adapter.execute([req])
    wait_for(lambda: req.sender.sent)  # streaming
    req.sender.cancelled = True
    assert req.sender.done.wait(5)
    finals = [r for r, f in req.sender.sent if f]
    assert len(finals) == 1 and finals[0].error.code == "CANCELLED"
    time.sleep(0.1)
    assert sum(1 for _, f in req.sender.sent if f) == 1  # nothing after the final
    adapter.finalize()


def test_gauges_follow_stats_once_the_model_serves():
    adapter = make_adapter(FakeFrontend())
    usage = FakeFamily.families["minisgl_kv_cache_usage_ratio"].metrics
    time.sleep(3 * adapter.settings.stats_interval_ms / 1000)  # stats are there; the model is not serving yet
    assert list(usage.values())[0].value == 0.0, "no stub call before the first execute (the load is not over)"
    req = FakeRequest({"text_input": text("hi")})
    adapter.execute([req])
    wait_for(lambda: list(usage.values())[0].value != 0.0)
    assert list(usage.values())[0].value == pytest.approx(0.2)
    assert req.sender.done.wait(5)
    adapter.finalize()


def test_auto_complete_config_fills_contract():
    class Cfg:
        def __init__(self):
            self.inputs, self.outputs, self.policy, self.mbs = [{"name": "text_input"}], [], None, None

        def as_dict(self):
            return {"input": self.inputs, "output": self.outputs}

        def add_input(self, spec):
            self.inputs.append(spec)

        def add_output(self, spec):
            self.outputs.append(spec)

        def set_max_batch_size(self, n):
            self.mbs = n

        def set_model_transaction_policy(self, policy):
            self.policy = policy

    cfg = TritonAdapter.auto_complete_config(Cfg(), FakePb)
    names = [i["name"] for i in cfg.inputs]
    assert names.count("text_input") == 1 and "sampling_parameters" in names and "input_ids" in names
    assert {o["name"] for o in cfg.outputs} == {"text_output", "finish_reason", "num_input_tokens",
                                                 "num_output_tokens", "logprobs", "prompt_logprobs"}
    assert cfg.policy == {"decoupled": True} and cfg.mbs == 0


def test_model_path_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MINISGL_MODEL_PATH", raising=False)
    assert resolve_model_path("/given", None) == "/given"
    monkeypatch.setenv("MINISGL_MODEL_PATH", str(tmp_path))
    assert resolve_model_path("", None) == str(tmp_path)
    monkeypatch.delenv("MINISGL_MODEL_PATH")
    with pytest.raises(ValueError, match="model_path"):
        resolve_model_path("", str(tmp_path / "model.py"))


def test_split_parameters_skips_empty_and_backend_keys():
    engine, adapter = split_parameters({"parameters": {
        "model_path": {"string_value": ""}, "tp_size": {"string_value": "2"}, "page_size": {"string_value": ""},
        "EXECUTION_ENV_PATH": {"string_value": "/x"}, "stats_interval_ms": {"string_value": "100"}}})
    assert engine == {"model_path": "", "tp_size": "2"}
    assert adapter == AdapterConfig(stats_interval_ms=100)


def test_split_parameters_leaves_unknown_and_removed_keys_to_the_engine_config():
    """They stay with the engine settings, even empty, so that EngineConfig.from_flat names them."""
    engine, _ = split_parameters({"parameters": {"sender_nice": {"string_value": ""},
                                                 "no_such_setting": {"string_value": "1"}}})
    assert engine == {"sender_nice": "", "no_such_setting": "1"}


def test_initialize_requires_decoupled():
    adapter = TritonAdapter(FakePb)
    with pytest.raises(ValueError, match="decoupled"):
        adapter.initialize({"model_config": json.dumps({"parameters": {}}), "model_name": "m",
                            "model_version": "1"})


def initialize_with(parameters):
    config = {"model_transaction_policy": {"decoupled": True},
              "parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    TritonAdapter(FakePb).initialize({"model_config": json.dumps(config), "model_name": "m", "model_version": "1"})


@pytest.mark.parametrize("key,value", [("sender_pacing", "1"), ("sender_nice", "0"), ("cpu_affinity", "off"),
                                       ("lpm_window", "128"), ("fuse_attention_prologue", "")])
def test_initialize_names_a_removed_setting(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"setting '{key}' was removed"):
        initialize_with({"model_path": str(tmp_path), key: value})


def test_initialize_names_an_unknown_setting(tmp_path):
    with pytest.raises(ConfigError, match="unknown engine setting 'sender_speed'"):
        initialize_with({"model_path": str(tmp_path), "sender_speed": "2"})


@pytest.mark.parametrize("key,value", [("cancel_grace_s", "0"), ("cancel_poll_interval_ms", "x"),
                                       ("stats_interval_ms", "-5")])
def test_initialize_rejects_a_bad_adapter_setting(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        initialize_with({"model_path": str(tmp_path), key: value})


@pytest.mark.parametrize("cores,tp,threads", [(2, 1, 1), (1, 1, 1), (16, 1, 15), (16, 2, 7), (3, 4, 1)])
def test_serving_cpu_threads_leave_a_core_to_the_serving_layer(monkeypatch, cores, tp, threads):
    from minisgl_backend.triton import adapter

    monkeypatch.setattr(adapter.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert adapter.serving_cpu_threads(tp) == threads


def test_stub_calls_of_other_threads_let_a_waiting_execute_go_first():
    """While execute() waits for the IPC lock, a sender's next stub call waits for it (at most
    a few ms): a lock is not fair, and new requests would queue behind a stream of sends."""
    adapter = TritonAdapter(FakePb)
    stub_lock = adapter.stub_lock
    started = time.monotonic()
    with stub_lock:  # nobody waits
        assert stub_lock.lock._is_owned()
    assert time.monotonic() - started < 0.004
    with stub_lock.lock:  # a send in progress; an execute arrives and waits
        waiter = threading.Thread(target=adapter.execute, args=([],))
        waiter.start()
        wait_for(lambda: stub_lock.execute_waiting, timeout=2)
        started = time.monotonic()
        with stub_lock:  # the next send steps aside, bounded
            pass
        assert time.monotonic() - started >= 0.8 * sender_module.EXECUTE_FIRST_MAX_S
    waiter.join(2)
    assert not stub_lock.execute_waiting  # execute got the lock and ran
