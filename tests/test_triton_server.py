"""End to end through a real tritonserver (nvidia-pytriton's binary, Python backend, CPU).

One server for the module on free ports, serving a tiny random-weight Llama twice (the second
model coalesces responses); stopped at the end, and the stop must be clean (conftest's
triton_server_factory).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from minisgl_backend.testing.triton import GrpcStream, TritonServer, grpc_inputs, parse_metric

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600)]

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "a b c d e f g",
    "Once upon a time there was",
    "1 2 3 4 5",
    "The quick brown fox jumps over the lazy dog",
]
MAX_TOKENS = 12
SETTINGS = {"max_total_tokens": 8192, "page_size": 16, "max_running_requests": 128}
COALESCING_MODEL = "minisgl_si3"  # the same weights with stream_interval 3


@pytest.fixture(scope="module")
def server(triton_server_factory, tiny_llama):
    models = {"minisgl": {"model_path": tiny_llama, **SETTINGS},
              COALESCING_MODEL: {"model_path": tiny_llama, **SETTINGS, "stream_interval": 3}}
    with triton_server_factory("triton", models) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline(tiny_llama):
    """Greedy reference texts from the offline API on the same weights."""
    from minisgl_backend import LLM, SamplingParams

    llm = LLM(tiny_llama, **SETTINGS)
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        results = llm.generate(PROMPTS, params)
    finally:
        llm.shutdown()
    return {p: r["text"] for p, r in zip(PROMPTS, results)}


def greedy_payload(prompt: str, **extra) -> dict:
    return {"text_input": prompt, "parameters": {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True},
            **extra}


def stream_requests(server: TritonServer, prompts: list[str], stream: bool, max_tokens: int = MAX_TOKENS,
                    **tensors) -> dict[str, dict]:
    client = GrpcStream(server.grpc_url)
    try:
        ids = []
        for i, prompt in enumerate(prompts):
            rid = f"r{i}"
            ids.append(rid)
            client.send(rid, grpc_inputs(prompt, stream=stream, **tensors),
                        parameters={"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})
        return client.collect(ids)
    finally:
        client.close()


# ---------------------------------------------------------------- correctness


def test_http_generate_matches_offline(server, offline):
    for prompt in PROMPTS:
        status, body = server.generate(greedy_payload(prompt, exclude_input_in_output=True))
        assert status == 200, body
        assert body["text_output"] == offline[prompt]


def test_http_generate_includes_prompt_by_default(server, offline):
    prompt = PROMPTS[0]
    status, body = server.generate(greedy_payload(prompt))
    assert status == 200, body
    assert body["text_output"] == prompt + offline[prompt]


def test_http_generate_stream_concatenates_to_offline(server, offline):
    prompt = PROMPTS[1]
    status, events = server.generate(greedy_payload(prompt, stream=True, return_finish_reason=True,
                                                    return_num_output_tokens=True), stream=True)
    assert status == 200, events
    assert len(events) >= 2
    assert "".join(e["text_output"] for e in events) == offline[prompt]
    assert events[-1]["finish_reason"] == "length"
    assert all(e["finish_reason"] == "" for e in events[:-1])
    assert sum(e["num_output_tokens"] for e in events) == MAX_TOKENS


def test_grpc_stream_and_nonstream_equal_offline(server, offline):
    streamed = stream_requests(server, PROMPTS, stream=True)
    whole = stream_requests(server, PROMPTS, stream=False, exclude_input_in_output=True)
    for i, prompt in enumerate(PROMPTS):
        s, w = streamed[f"r{i}"], whole[f"r{i}"]
        assert s["error"] is None and w["error"] is None, (s["error"], w["error"])
        assert s["final"] and w["final"]
        assert w["responses"] == 1, "a non-streaming request gets exactly one response"
        assert "".join(s["texts"]) == w["texts"][0] == offline[prompt]
    # A stream is cut into several responses, unless all of it is ready when the receiver next
    # wakes: a 12-token request on this tiny model can be (adaptive coalescing), 96 tokens are not
    long_streamed = stream_requests(server, PROMPTS[:1], stream=True, max_tokens=96)["r0"]
    long_whole = stream_requests(server, PROMPTS[:1], stream=False, max_tokens=96,
                                 exclude_input_in_output=True)["r0"]
    assert long_streamed["responses"] >= 2, long_streamed
    assert "".join(long_streamed["texts"]) == long_whole["texts"][0]


def test_stream_interval_coalesces_without_changing_the_text(server, offline):
    client = GrpcStream(server.grpc_url, model=COALESCING_MODEL)
    try:
        for i, prompt in enumerate(PROMPTS):
            for stream in (True, False):
                client.send(f"{stream}{i}", grpc_inputs(prompt, stream=stream, return_num_output_tokens=True,
                                                        return_finish_reason=True, exclude_input_in_output=True),
                            parameters={"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True})
        results = client.collect([f"{s}{i}" for i in range(len(PROMPTS)) for s in (True, False)])
    finally:
        client.close()
    for i, prompt in enumerate(PROMPTS):
        streamed, whole = results[f"True{i}"], results[f"False{i}"]
        assert streamed["error"] is None and whole["error"] is None
        assert "".join(streamed["texts"]) == "".join(whole["texts"]) == offline[prompt]
        counts = [int(o["num_output_tokens"][0]) for o in streamed["outputs"]]
        assert sum(counts) == MAX_TOKENS and all(c >= 3 for c in counts[:-1]), counts
        assert len(counts) <= MAX_TOKENS // 3 + 1
        assert streamed["outputs"][-1]["finish_reason"][0] == b"length" and streamed["final"]
        assert [int(o["num_output_tokens"][0]) for o in whole["outputs"]] == [MAX_TOKENS]


def test_grpc_flat_tensors_and_return_switches(server, offline):
    prompt = PROMPTS[2]
    client = GrpcStream(server.grpc_url)
    try:
        client.send("flat", grpc_inputs(prompt, max_tokens=np.array([MAX_TOKENS], np.int32),
                                        temperature=np.array([0.0], np.float32), ignore_eos=True,
                                        exclude_input_in_output=True, return_finish_reason=True,
                                        return_num_input_tokens=True, return_num_output_tokens=True,
                                        return_logprobs=True))
        got = client.collect(["flat"])["flat"]
    finally:
        client.close()
    assert got["error"] is None, got["error"]
    out = got["outputs"][-1]
    assert got["texts"][0] == offline[prompt]
    assert out["finish_reason"][0] == b"length"
    assert int(out["num_output_tokens"][0]) == MAX_TOKENS
    assert int(out["num_input_tokens"][0]) > 0
    import json

    logprobs = json.loads(out["logprobs"][0])
    assert len(logprobs) == MAX_TOKENS and all(lp <= 0 for lp in logprobs)


def test_64_concurrent_streams(server, offline):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)]
    results: dict[int, dict] = {}

    def one_client(k: int) -> None:
        got = stream_requests(server, prompts[k * 8:(k + 1) * 8], stream=True)
        for i in range(8):
            results[k * 8 + i] = got[f"r{i}"]

    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 64
    for i, prompt in enumerate(prompts):
        assert results[i]["error"] is None, results[i]["error"]
        assert "".join(results[i]["texts"]) == offline[prompt], f"stream {i}"
    assert server.is_alive()


# ---------------------------------------------------------------- cancellation


def test_cancellation_frees_pages(server):
    aborted_before = server.metric("minisgl_requests_total", {"finish_reason": "abort"})
    client = GrpcStream(server.grpc_url)
    for i in range(4):
        client.send(f"long{i}", grpc_inputs(PROMPTS[i], stream=True),
                    parameters={"max_tokens": 2000, "ignore_eos": True, "temperature": 0.0})
    seen = 0
    deadline = time.monotonic() + 60
    while seen < 8 and time.monotonic() < deadline:  # the requests are decoding
        result, error = client.queue.get(timeout=60)
        assert error is None, error
        seen += 1
    deadline = time.monotonic() + 10  # wait for the gauges to show the busy engine
    while server.metric("minisgl_num_requests_running") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    busy = server.metrics_text()
    assert parse_metric(busy, "minisgl_num_requests_running") > 0
    assert parse_metric(busy, "minisgl_kv_cache_usage_ratio") > 0
    client.close(cancel=True)  # gRPC stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.metric("minisgl_requests_total", {"finish_reason": "abort"}) >= aborted_before + 4:
            break
        time.sleep(0.2)
    assert server.metric("minisgl_requests_total", {"finish_reason": "abort"}) == aborted_before + 4
    assert parse_metric(busy, "minisgl_kv_pages", {"state": "total"}) > 0
    server.wait_idle()
    # the server still serves
    status, body = server.generate(greedy_payload(PROMPTS[0]))
    assert status == 200, body


def test_client_disconnect_aborts(server):
    """An HTTP client that goes away mid-stream: the request is aborted, pages come back."""
    import http.client
    import json

    aborted_before = server.metric("minisgl_requests_total", {"finish_reason": "abort"})
    conn = http.client.HTTPConnection(server.http_url, timeout=30)
    conn.request("POST", "/v2/models/minisgl/generate_stream",
                 body=json.dumps({"text_input": PROMPTS[3], "stream": True,
                                  "parameters": {"max_tokens": 1500, "ignore_eos": True}}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read1(64)
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.metric("minisgl_requests_total", {"finish_reason": "abort"}) > aborted_before:
            break
        time.sleep(0.2)
    else:
        pytest.fail("an HTTP client that disconnected mid-stream was not aborted")
    server.wait_idle()


# ---------------------------------------------------------------- bad input


BAD_HTTP = {
    "invalid JSON": ({"text_input": "hi", "sampling_parameters": "{max_tokens: 3"}, "not valid JSON"),
    "unknown field": ({"text_input": "hi", "sampling_parameters": '{"max_tokenz": 3}'}, "max_tokenz"),
    "unknown request parameter": ({"text_input": "hi", "parameters": {"colour": "red"}}, "colour"),
    "out of range": ({"text_input": "hi", "sampling_parameters": '{"temperature": -1}'}, "temperature"),
    "top_p out of range": ({"text_input": "hi", "sampling_parameters": '{"top_p": 1.5}'}, "top_p"),
    "number that does not parse": ({"text_input": "hi", "sampling_parameters": '{"max_tokens": "lots"}'},
                                   "max_tokens"),
    "empty prompt": ({"text_input": ""}, "empty"),
    "no prompt": ({"stream": False}, "text_input"),
    "token id outside vocab": ({"input_ids": [1, 2, 10**6]}, "vocabulary"),
    "too long prompt": ({"input_ids": [5] * 3000}, "context"),
    "min_tokens above max_tokens": ({"text_input": "hi", "sampling_parameters":
                                     '{"max_tokens": 2, "min_tokens": 5}'}, "min_tokens"),
    "100k-deep sampling_parameters": ({"text_input": "hi", "sampling_parameters": "[" * 100_000 + "]" * 100_000},
                                      "sampling_parameters is nested too deeply"),
    "lone surrogate in sampling_parameters": ({"text_input": "hi", "sampling_parameters": r'{"stop": "\ud800"}'},
                                              "sampling_parameters['stop'] holds a lone UTF-16 surrogate"),
    "text_input and input_ids together": ({"text_input": "hi", "input_ids": [1, 2]}, "send one of them"),
}


@pytest.mark.parametrize("case", sorted(BAD_HTTP))
def test_bad_input_http_is_invalid_arg(server, case):
    payload, needle = BAD_HTTP[case]
    status, body = server.generate(payload)
    assert status == 400, body  # 400 is how Triton's HTTP front-end reports INVALID_ARG
    assert needle in body["error"], body
    status, body = server.generate(greedy_payload(PROMPTS[0]))
    assert status == 200, body


BAD_GRPC = {
    "non-UTF-8 text": (lambda: grpc_inputs(b"\xff\xfe bad"), None, "UTF-8"),
    "number that does not parse (request parameter)": (lambda: grpc_inputs("hi"), {"max_tokens": "abc"},
                                                        "max_tokens"),
    "wrong tensor type": (lambda: grpc_inputs("hi", max_tokens=np.array([3], np.int64)), None, "max_tokens"),
    "wrong bool type": (lambda: grpc_inputs("hi", stream=np.array([1], np.int32)), None, "stream"),
    "two strings in text_input": (lambda: _two_texts(), None, "text_input"),
    "invalid sampling JSON": (lambda: grpc_inputs("hi", sampling_parameters="[1, 2"), None, "JSON"),
}


def _two_texts():
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("text_input", [2], "BYTES")
    inp.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    return [inp]


@pytest.mark.parametrize("case", sorted(BAD_GRPC))
def test_bad_input_grpc_one_error_then_serves(server, case):
    make_inputs, params, needle = BAD_GRPC[case]
    client = GrpcStream(server.grpc_url)
    try:
        client.send("bad", make_inputs(), parameters=params)
        got = client.collect(["bad"], timeout=30)["bad"]
        assert got["error"] is not None, got
        assert needle in str(got["error"]), str(got["error"])
        # the same stream serves the next request, and nothing more came for the rejected one (a
        # late error would be taken for the next request's: one request is pending at a time)
        client.send("ok", grpc_inputs(PROMPTS[0], stream=True),
                    parameters={"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True})
        after = client.collect(["ok"])
    finally:
        client.close()
    assert set(after) == {"ok"}, f"exactly one response for a rejected request: {after}"
    assert after["ok"]["error"] is None and after["ok"]["final"], after["ok"]


def test_malformed_bytes_tensor_does_not_kill_the_model(server):
    """A BYTES tensor without its 4-byte length prefixes (0f0f0f0f read as a length): refused
    (by Triton's own validation), and the model keeps serving."""
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2

    client = grpcclient.InferenceServerClient(server.grpc_url)
    request = service_pb2.ModelInferRequest(model_name="minisgl", id="raw")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "text_input", "BYTES"
    tensor.shape.extend([1])
    request.raw_input_contents.append(b"\x0f\x0f\x0f\x0fHello world")  # length prefix says 252645135

    def requests():
        yield request

    try:
        responses = list(client._client_stub.ModelStreamInfer(requests(), timeout=30))
    finally:
        client.close()
    assert responses and responses[0].error_message, responses
    assert server.is_alive()
    status, body = server.generate(greedy_payload(PROMPTS[0]))
    assert status == 200, body


# ---------------------------------------------------------------- metrics


def test_metrics_move(server):
    before = server.metrics_text()
    status, body = server.generate(greedy_payload(PROMPTS[4]))
    assert status == 200, body
    after = _metrics_once(server, lambda text: parse_metric(text, "minisgl_e2e_request_latency_seconds_count")
                          > parse_metric(before, "minisgl_e2e_request_latency_seconds_count"))

    def delta(name, labels=None):
        return parse_metric(after, name, labels) - parse_metric(before, name, labels)

    assert delta("minisgl_prompt_tokens_total") > 0
    assert delta("minisgl_generation_tokens_total") == MAX_TOKENS
    assert delta("minisgl_requests_total", {"finish_reason": "length"}) == 1
    assert delta("minisgl_time_to_first_token_seconds_count") == 1
    assert delta("minisgl_e2e_request_latency_seconds_count") == 1
    assert delta("minisgl_time_per_output_token_seconds_count") == 1
    assert delta("minisgl_request_queue_time_seconds_count") == 1
    # gauges are refreshed by the watcher every stats_interval_ms
    _metrics_once(server, lambda text: parse_metric(text, "minisgl_kv_pages", {"state": "total"}) > 0)
    assert "# TYPE minisgl_time_to_first_token_seconds histogram" in after
    # a long prompt twice: the second time its prefix comes from the radix cache
    long_prompt = " ".join(f"w{i}" for i in range(80))
    hits = server.metric("minisgl_cache_hit_tokens_total")
    server.generate(greedy_payload(long_prompt))
    server.generate(greedy_payload(long_prompt))
    _metrics_once(server, lambda text: parse_metric(text, "minisgl_cache_hit_tokens_total") >= hits + 16)
    invalid = server.metric("minisgl_requests_total", {"finish_reason": "invalid"})
    status, _ = server.generate({"text_input": "hi", "sampling_parameters": '{"top_p": 7}'})
    assert status == 400
    assert server.metric("minisgl_requests_total", {"finish_reason": "invalid"}) == invalid + 1


def _metrics_once(server: TritonServer, condition, timeout: float = 10.0) -> str:
    """The metrics text once `condition(text)` holds (the stub sends recorded metrics in rounds);
    fails with the last text after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition(text := server.metrics_text()):
        if time.monotonic() > deadline:
            pytest.fail("the metrics did not move:\n" + "\n".join(
                line for line in text.splitlines() if line.startswith("minisgl_")))
        time.sleep(0.1)
    return text


# ---------------------------------------------------------------- perf_analyzer


def test_perf_analyzer_streaming_profile(server, tmp_path, require_tool):
    """A short perf_analyzer --streaming profile (`make test` installs perf_analyzer)."""
    import json
    import subprocess

    from minisgl_backend.checkout import ROOT

    pa = ROOT / "build" / "perf_analyzer" / "perf_analyzer"
    require_tool(None if pa.exists() else "perf_analyzer not installed (make perf-analyzer)")
    runs = subprocess.run([str(pa), "--version"], capture_output=True, timeout=30).returncode == 0
    require_tool(None if runs else "perf_analyzer does not run on this machine")
    params = json.dumps({"max_tokens": 16, "ignore_eos": True})
    data = {"data": [{"text_input": [p], "stream": [True], "sampling_parameters": [params]} for p in PROMPTS]}
    (tmp_path / "input.json").write_text(json.dumps(data))
    proc = subprocess.run(
        [str(pa), "-m", "minisgl", "-u", server.grpc_url, "-i", "grpc", "--streaming",
         "--input-data", str(tmp_path / "input.json"), "--concurrency-range", "4",
         "--measurement-interval", "1000", "--stability-percentage", "999", "--max-trials", "4",
         "-f", str(tmp_path / "pa.csv")],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Response Throughput" in proc.stdout
    assert (tmp_path / "pa.csv").read_text().count("\n") >= 2
    assert server.is_alive()
    server.wait_idle()
