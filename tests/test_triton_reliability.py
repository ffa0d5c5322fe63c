"""Reliability through a real tritonserver: one request's fault fails only that request, and the
death of the Python-backend stub leaves no engine process behind.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from minisgl_backend.procinfo import children, cmdline
from minisgl_backend.testing.procinfo import alive
from minisgl_backend.testing.triton import GrpcStream, TritonServer, grpc_inputs

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600)]

FAULT_SEED = 777
DETOK_FAULT_SEED = 778
MAX_TOKENS = 12
SETTINGS = {"max_total_tokens": 4096, "page_size": 16, "max_running_requests": 64,
            "inject_sampling_fault_seed": FAULT_SEED, "inject_sampling_fault_step": 3,
            "inject_detokenize_fault_seed": DETOK_FAULT_SEED}
PROMPTS = ["Hello, my name is", "The capital of France is", "a b c d e f g", "Once upon a time there was",
           "1 2 3 4 5", "The quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def server(triton_server_factory, tiny_llama):
    with triton_server_factory("triton-reliability", {"minisgl": {"model_path": tiny_llama, **SETTINGS}}) as srv:
        yield srv


def run_each_on_its_own_stream(server: TritonServer, requests: list[tuple[str, int]]) -> list[dict]:
    """One gRPC stream per request (a stream error does not say which request it belongs to),
    all sent before any is collected, so they share batches."""
    clients = [GrpcStream(server.grpc_url) for _ in requests]
    try:
        for i, (client, (prompt, seed)) in enumerate(zip(clients, requests)):
            client.send(f"r{i}", grpc_inputs(prompt, stream=True),
                        parameters={"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, "seed": seed})
        return [client.collect([f"r{i}"])[f"r{i}"] for i, client in enumerate(clients)]
    finally:
        for client in clients:
            client.close()


def test_injected_fault_fails_only_its_request(server):
    """Five gRPC streams and one HTTP request share batches; the HTTP one hits the injected fault.
    (Triton's wire shows no error code for a decoupled model: /generate answers every error with
    400 and a stream error carries only the message; test_request_parsing checks that
    ErrorKind.REQUEST becomes INTERNAL.)"""
    import threading

    requests = [(prompt, 100 + i) for i, prompt in enumerate(PROMPTS)]
    solo = [run_each_on_its_own_stream(server, [request])[0] for request in requests]
    assert all(s["error"] is None and s["final"] for s in solo)
    bad = 2
    errors_before = server.metric("minisgl_requests_total", {"finish_reason": "error"})
    faulty: dict = {}
    payload = {"text_input": PROMPTS[bad], "parameters": {"max_tokens": MAX_TOKENS, "temperature": 0,
                                                           "ignore_eos": True, "seed": FAULT_SEED}}
    thread = threading.Thread(target=lambda: faulty.update(zip(("status", "body"), server.generate(payload))))
    thread.start()
    others = [r for i, r in enumerate(requests) if i != bad]
    together = run_each_on_its_own_stream(server, others)
    thread.join(120)
    assert faulty["status"] != 200, faulty
    assert "failed in the engine" in faulty["body"]["error"] and "injected sampling fault" in faulty["body"]["error"]
    for got, want in zip(together, [s for i, s in enumerate(solo) if i != bad]):
        assert got["error"] is None and got["final"], got["error"]
        assert "".join(got["texts"]) == "".join(want["texts"]), "a request changed by its faulty batch-mate"
    assert server.metric("minisgl_requests_total", {"finish_reason": "error"}) == errors_before + 1
    server.wait_idle()
    status, _ = server.generate({"text_input": "still", "parameters": {"max_tokens": 2}})
    assert status == 200
    assert server.model_ready(), "one request's fault does not take the model out of service"


def test_injected_detokenization_fault_fails_only_its_request(server):
    """The frontend cannot make one request's text: that request alone ends with an error (and
    is aborted in the scheduler), its batch-mates stream on unchanged, nothing leaks."""
    requests = [(prompt, 200 + i) for i, prompt in enumerate(PROMPTS)]
    solo = [run_each_on_its_own_stream(server, [request])[0] for request in requests]
    bad = 1
    mixed = [(prompt, DETOK_FAULT_SEED if i == bad else seed) for i, (prompt, seed) in enumerate(requests)]
    together = run_each_on_its_own_stream(server, mixed)
    assert "detokenization failed" in str(together[bad]["error"]), together[bad]
    for i, (got, want) in enumerate(zip(together, solo)):
        if i != bad:
            assert got["error"] is None and got["final"], got["error"]
            assert "".join(got["texts"]) == "".join(want["texts"]), "a request changed by its faulty batch-mate"
    server.wait_idle()


# ---------------------------------------------------------------- stub death


def test_stub_sigkill_under_bare_tritonserver(triton_server_factory, tiny_llama):
    """Bare tritonserver 2.51 (no `make serve` supervisor): the stub dies, the scheduler
    processes follow within 5 s (their death signal is tied to the stub), new requests get an
    error, but Triton keeps the model READY and never restarts a decoupled model's stub. That is
    why `make serve` restarts the server (tests/test_serve_shutdown.py). Its stop is not checked for a
    clean unload: the stub that would unload the model is gone."""
    models = {"minisgl": {"model_path": tiny_llama, "max_total_tokens": 4096}}
    client = None
    with triton_server_factory("triton-stub-kill", models, extra_args=["--model-control-mode=explicit",
                                                                       "--load-model=minisgl"],
                               clean_shutdown=False, stop_timeout=20) as srv:
        stubs = [p for p in children(srv.proc.pid) if "triton_python_backend_stub" in cmdline(p)]
        assert len(stubs) == 1, stubs
        schedulers = [p for p in children(stubs[0]) if "minisgl_backend.launch" in cmdline(p)]
        assert schedulers, "the scheduler process runs below the stub"
        try:
            client = GrpcStream(srv.grpc_url)
            client.send("s0", grpc_inputs(PROMPTS[0], stream=True),
                        parameters={"max_tokens": 3000, "ignore_eos": True})
            client.wait_started(["s0"])  # the stream runs
            os.kill(stubs[0], signal.SIGKILL)
            killed = time.monotonic()
            while any(alive(p) for p in schedulers):
                assert time.monotonic() - killed < 5, "scheduler processes outlived the stub by 5 s"
                time.sleep(0.05)
            status, body = srv.generate({"text_input": "hi", "parameters": {"max_tokens": 2}}, timeout=30)
            assert status != 200 and "not healthy" in body["error"], body
            assert srv.model_ready(), ("Triton 2.51 keeps reporting READY (if this fails, Triton learnt better: "
                                       "update README)")
        finally:
            if client is not None:
                client.close(cancel=True)
