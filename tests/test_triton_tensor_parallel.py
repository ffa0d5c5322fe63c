"""TP=2 through a real tritonserver: equals TP=1, and a dead rank takes the model out of service."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from minisgl_backend.testing.triton import GrpcStream, grpc_inputs

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600)]

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5"]
SETTINGS = {"max_total_tokens": 4096, "page_size": 16, "max_running_requests": 32, "tp_size": 2}
GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}


# model name -> (arch, num_kv_heads); "minisgl" is also the one whose rank gets killed
MODELS = {"minisgl": ("qwen3", 1), "minisgl_qwen3_kv2": ("qwen3", 2),
          "minisgl_llama_kv1": ("llama", 1), "minisgl_llama_kv2": ("llama", 2)}


@pytest.fixture(scope="module")
def tp2_server(triton_server_factory, tiny_model_factory):
    """One server with every model of MODELS loaded (and READY) under explicit model control: a
    model whose engine died can unload itself, so readiness says so."""
    paths = {name: tiny_model_factory(arch, num_kv_heads=kv) for name, (arch, kv) in MODELS.items()}
    models = {name: {"model_path": path, **SETTINGS} for name, path in paths.items()}
    loads = [f"--load-model={name}" for name in MODELS]
    with triton_server_factory("triton-tp2", models, extra_args=["--model-control-mode=explicit", *loads]) as srv:
        yield srv, paths


def _scheduler_pids(model_path: str) -> dict[int, int]:
    """rank -> pid of the scheduler processes serving `model_path`."""
    out = subprocess.run(["pgrep", "-af", "minisgl_backend.launch"], capture_output=True, text=True).stdout
    pids = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=5)  # pid python -m minisgl_backend.launch RANK SPEC
        if len(parts) == 6 and parts[3] == "minisgl_backend.launch" and f'"{model_path}"' in parts[5]:
            pids[int(parts[4])] = int(parts[0])
    return pids


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tp2_server_equals_tp1_offline(tp2_server, name):
    from minisgl_backend import LLM, SamplingParams

    srv, paths = tp2_server
    assert srv.model_ready(name)
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
    assert srv.model_ready()
    long = {"max_tokens": 3000, "temperature": 0.0, "ignore_eos": True}
    clients = [GrpcStream(srv.grpc_url) for _ in range(3)]  # stream errors carry no request id: one each
    try:
        for i, client in enumerate(clients):
            client.send(f"long{i}", grpc_inputs("a b c", stream=True), parameters=long)
        for i, client in enumerate(clients):  # every stream runs
            client.wait_started([f"long{i}"])
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
    while srv.model_ready() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not srv.model_ready(), "a model whose engine died must not report ready"
    while _scheduler_pids(paths["minisgl"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _scheduler_pids(paths["minisgl"]) == {}, "the unload must leave no scheduler process behind"
    assert all(srv.model_ready(name) for name in MODELS if name != "minisgl"), "the other models keep serving"
