"""TP=2 through a real tritonserver: equals TP=1, and a dead rank takes the model out of service."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.triton_server import GrpcStream, TritonServer, grpc_inputs, triton_available

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600)]

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5"]
SETTINGS = {"max_total_tokens": 4096, "page_size": 16, "max_running_requests": 32, "tp_size": 2}
GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tp2_server(tiny_model_factory, tmp_path_factory):
    reason = triton_available()
    if reason:
        pytest.skip(reason)
    from minisgl_backend.triton.repository import make_model_repository

    work = tmp_path_factory.mktemp("triton-tp2")
    model = tiny_model_factory("qwen3", num_kv_heads=1)
    repo = make_model_repository(work / "repo", {"model_path": model, **SETTINGS})
    # explicit model control: a model whose engine died can unload itself, so readiness says so
    srv = TritonServer(repo, work / "server.log", extra_args=["--model-control-mode=explicit", "--load-model=minisgl"])
    srv.start()
    yield srv, model
    srv.stop()
    assert srv.leftovers == [], srv.leftovers


def _scheduler_pids() -> dict[int, int]:
    out = subprocess.run(["pgrep", "-af", "minisgl_backend.launch"], capture_output=True, text=True).stdout
    pids = {}
    for line in out.splitlines():
        parts = line.split()
        if "minisgl_backend.launch" in parts:
            pids[int(parts[parts.index("minisgl_backend.launch") + 1])] = int(parts[0])
    return pids


def _model_ready(srv: TritonServer) -> bool:
    try:
        return urllib.request.urlopen(f"http://{srv.http_url}/v2/models/minisgl/ready", timeout=5).status == 200
    except urllib.error.HTTPError:
        return False


def test_tp2_server_equals_tp1_offline(tp2_server):
    from minisgl_backend import LLM, SamplingParams

    srv, model = tp2_server
    reference = LLM(model, max_total_tokens=4096, page_size=16).generate(PROMPTS, SamplingParams(**GREEDY))
    client = GrpcStream(srv.grpc_url)
    try:
        for i, prompt in enumerate(PROMPTS):
            client.send(f"r{i}", grpc_inputs(prompt, stream=True), parameters=GREEDY)
        got = client.collect([f"r{i}" for i in range(len(PROMPTS))])
    finally:
        client.close()
    assert ["".join(got[f"r{i}"]["texts"]) for i in range(len(PROMPTS))] == [r["text"] for r in reference]


def test_dead_rank_errors_requests_and_unloads(tp2_server):
    srv, _ = tp2_server
    assert _model_ready(srv)
    long = {"max_tokens": 3000, "temperature": 0.0, "ignore_eos": True}
    clients = [GrpcStream(srv.grpc_url) for _ in range(3)]  # stream errors carry no request id: one each
    try:
        for i, client in enumerate(clients):
            client.send(f"long{i}", grpc_inputs("a b c", stream=True), parameters=long)
        time.sleep(1.0)
        pids = _scheduler_pids()
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        got = {}
        for i, client in enumerate(clients):
            got.update(client.collect([f"long{i}"], timeout=20))
        assert time.monotonic() - killed < 20
    finally:
        for client in clients:
            client.close()
    assert all(r["error"] and "engine failure" in str(r["error"]) for r in got.values()), got
    deadline = time.monotonic() + 30
    while _model_ready(srv) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _model_ready(srv), "a model whose engine died must not report ready"
    while _scheduler_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _scheduler_pids() == {}, "the unload must leave no scheduler process behind"
