"""TP=2 through a real tritonserver: equals TP=1, and a dead rank takes the model out of service."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.triton_server import GrpcStream, TritonServer, grpc_inputs, require_triton

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600)]

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5"]
SETTINGS = {"max_total_tokens": 4096, "page_size": 16, "max_running_requests": 32, "tp_size": 2}
GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}


# model name -> (arch, num_kv_heads); "minisgl" is also the one whose rank gets killed
MODELS = {"minisgl": ("qwen3", 1), "minisgl_qwen3_kv2": ("qwen3", 2),
          "minisgl_llama_kv1": ("llama", 1), "minisgl_llama_kv2": ("llama", 2)}


@pytest.fixture(scope="module")
def tp2_server(tiny_model_factory, tmp_path_factory):
    require_triton()
    from minisgl_backend.triton.repository import make_model_repository

    work = tmp_path_factory.mktemp("triton-tp2")
    paths = {name: tiny_model_factory(arch, num_kv_heads=kv) for name, (arch, kv) in MODELS.items()}
    for name, path in paths.items():
        make_model_repository(work / "repo", {"model_path": path, **SETTINGS}, model_name=name)
    # explicit model control: a model whose engine died can unload itself, so readiness says so
    loads = [f"--load-model={name}" for name in MODELS]
    srv = TritonServer(work / "repo", work / "server.log", extra_args=["--model-control-mode=explicit", *loads])
    srv.start()
    deadline = time.monotonic() + 300
    while not all(_model_ready(srv, name) for name in MODELS) and time.monotonic() < deadline:
        time.sleep(0.5)
    yield srv, paths
    srv.stop()
    assert srv.leftovers == [], srv.leftovers


def _scheduler_pids(model_path: str) -> dict[int, int]:
    """rank -> pid of the scheduler processes serving `model_path`."""
    out = subprocess.run(["pgrep", "-af", "minisgl_backend.launch"], capture_output=True, text=True).stdout
    pids = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=5)  # pid python -m minisgl_backend.launch RANK SPEC
        if len(parts) == 6 and parts[3] == "minisgl_backend.launch" and f'"{model_path}"' in parts[5]:
            pids[int(parts[4])] = int(parts[0])
    return pids


def _model_ready(srv: TritonServer, name: str = "minisgl") -> bool:
    try:
        return urllib.request.urlopen(f"http://{srv.http_url}/v2/models/{name}/ready", timeout=5).status == 200
    except urllib.error.HTTPError:
        return False


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tp2_server_equals_tp1_offline(tp2_server, name):
    from minisgl_backend import LLM, SamplingParams

    srv, paths = tp2_server
    assert _model_ready(srv, name)
    reference = LLM(paths[name], max_total_tokens=4096, page_size=16).generate(PROMPTS, SamplingParams(**GREEDY))
    client = GrpcStream(srv.grpc_url, model=name)
    try:
        for i, prompt in enumerate(PROMPTS):
            client.send(f"r{i}", grpc_inputs(prompt, stream=True), parameters=GREEDY)
        got = client.collect([f"r{i}" for i in range(len(PROMPTS))])
    finally:
        client.close()
    assert ["".join(got[f"r{i}"]["texts"]) for i in range(len(PROMPTS))] == [r["text"] for r in reference]


def test_dead_rank_errors_requests_and_unloads(tp2_server):
    srv, paths = tp2_server
    assert _model_ready(srv)
    long = {"max_tokens": 3000, "temperature": 0.0, "ignore_eos": True}
    clients = [GrpcStream(srv.grpc_url) for _ in range(3)]  # stream errors carry no request id: one each
    try:
        for i, client in enumerate(clients):
            client.send(f"long{i}", grpc_inputs("a b c", stream=True), parameters=long)
        time.sleep(1.0)
        pids = _scheduler_pids(paths["minisgl"])
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
    while _scheduler_pids(paths["minisgl"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _scheduler_pids(paths["minisgl"]) == {}, "the unload must leave no scheduler process behind"
    assert all(_model_ready(srv, name) for name in MODELS if name != "minisgl"), "the other models keep serving"
