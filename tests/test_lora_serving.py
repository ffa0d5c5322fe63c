"""LoRA adapters served through tritonserver (multi_lora.json, `lora_name` in the sampling
parameters, the vLLM backend's error messages) and the OpenAI frontend (adapters as models,
load and unload at run time)."""

from __future__ import annotations

import json
import os
import time

import httpx
import openai
import pytest

from minisgl_backend import LLM, SamplingParams
from minisgl_backend.testing.openai_frontend import OpenAIFrontend
from minisgl_backend.testing.triton import GrpcStream, grpc_inputs
from tests.test_lora_units import make_peft_adapter

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600)]

SETTINGS = {"max_total_tokens": 4096, "page_size": 16, "max_lora_rank": 8}
PROMPT = "The capital of France is"
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("served-adapters")
    paths = {name: make_peft_adapter(tiny_llama, root / name, targets, rank=4, seed=seed)
             for name, targets, seed in (("a", ["q_proj", "v_proj"], 1), ("b", ["o_proj", "down_proj"], 2),
                                         ("late", ["up_proj"], 3))}
    return str(root), paths


@pytest.fixture(scope="module")
def offline(tiny_llama, adapters):
    _, paths = adapters
    llm = LLM(tiny_llama, lora_modules=paths, device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8)
    names = [None, "a", "b", "late"]
    outs = llm.generate([PROMPT] * len(names), [SamplingParams(**GREEDY, lora_name=n) for n in names])
    llm.shutdown()
    return {n: o["text"] for n, o in zip(names, outs)}


@pytest.fixture(scope="module")
def triton(triton_server_factory, tiny_llama, adapters, tmp_path_factory):
    from minisgl_backend.triton.repository import make_model_repository

    root, paths = adapters
    repo = make_model_repository(tmp_path_factory.mktemp("lora-repo") / "repo",
                                 {"model_path": tiny_llama, "lora_root": root, **SETTINGS},
                                 lora_modules={"a": paths["a"], "b": paths["b"]})
    with triton_server_factory("lora", repository=repo) as srv:
        yield srv


@pytest.fixture(scope="module")
def frontend(triton, tmp_path_factory):
    with OpenAIFrontend.beside(triton, tmp_path_factory.mktemp("lora-fe")) as fe:
        yield fe


@pytest.fixture(scope="module")
def client(frontend) -> openai.OpenAI:
    return frontend.sdk_client()


def test_http_generate_runs_each_adapter(triton, offline):
    for name in (None, "a", "b"):
        params = dict(GREEDY, **({"lora_name": name} if name else {}))
        status, body = triton.generate({"text_input": PROMPT, "parameters": params, "exclude_input_in_output": True})
        assert status == 200, body
        assert body["text_output"] == offline[name]
    assert offline["a"] != offline[None] and offline["b"] != offline[None]


def test_grpc_sampling_parameters_name_the_adapter_and_unknown_names_get_the_vllm_message(triton, offline):
    client = GrpcStream(triton.grpc_url)
    got = {}
    try:
        for rid, name in (("ok", "b"), ("bad", "nope")):  # one at a time: a stream error names no request
            params = json.dumps(dict(GREEDY, lora_name=name))
            client.send(rid, grpc_inputs(PROMPT, sampling_parameters=params, exclude_input_in_output=True))
            got.update(client.collect([rid]))
    finally:
        client.close()
    assert got["ok"]["error"] is None and "".join(got["ok"]["texts"]) == offline["b"]
    assert "LoRA nope is not supported, we currently support ['a', 'b']" in str(got["bad"]["error"])
    status, body = triton.generate({"text_input": PROMPT, "parameters": dict(GREEDY, lora_name="nope")})
    assert status == 400, body  # how Triton's HTTP front-end reports INVALID_ARG
    assert body["error"] == "LoRA nope is not supported, we currently support ['a', 'b']"


def test_openai_lists_adapters_as_models_and_routes_to_them(client, frontend, offline):
    cards = {m.id: m for m in client.models.list().data}
    assert {"minisgl", "a", "b"} <= set(cards)
    assert cards["a"].parent == "minisgl" and getattr(cards["minisgl"], "parent", None) is None
    for name in ("minisgl", "a", "b"):
        out = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == offline[None if name == "minisgl" else name]
        assert out.model == name
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)


def test_adapters_load_and_unload_at_run_time(client, frontend, adapters, offline, tmp_path):
    root, paths = adapters
    url = frontend.base_url
    refused = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
    assert refused.status_code == 400 and "outside lora_root" in refused.text
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": paths["late"]})
    assert loaded.status_code == 200, loaded.text
    out = client.completions.create(model="late", prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == offline["late"]
    twice = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": paths["late"]})
    assert twice.status_code == 400 and "already loaded" in twice.text
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert gone.status_code == 200, gone.text
    assert "late" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt=PROMPT, max_tokens=2)
    unknown = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert unknown.status_code == 400 and "no adapter named 'late'" in unknown.text
    bad = os.path.join(root, "not-an-adapter")
    os.makedirs(bad, exist_ok=True)
    broken = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": bad})
    assert broken.status_code == 400 and "no adapter_config.json" in broken.text


def test_metrics_count_requests_per_adapter(triton):
    client = GrpcStream(triton.grpc_url)
    try:
        params = json.dumps({"max_tokens": 400, "ignore_eos": True, "lora_name": "b"})
        client.send("long", grpc_inputs(PROMPT, sampling_parameters=params))
        deadline = time.monotonic() + 60
        while triton.metric("minisgl_lora_requests", {"adapter": "b", "state": "running"}) != 1:
            assert time.monotonic() < deadline, triton.metrics_text()
            time.sleep(0.05)
        got = client.collect(["long"])
    finally:
        client.close()
    assert got["long"]["error"] is None
    deadline = time.monotonic() + 30
    while triton.metric("minisgl_lora_requests", {"adapter": "b", "state": "running"}) != 0:
        assert time.monotonic() < deadline, triton.metrics_text()
        time.sleep(0.05)


def test_the_server_drains_clean(triton, frontend):
    gauges = triton.wait_idle()  # raises unless every page is free or cached and nothing runs
    assert gauges["locked"] == 0 and gauges["free"] + gauges["cached"] == gauges["total"]
    assert triton.metric("minisgl_lora_loads_total") >= 3  # a, b and late, each on first use
    assert triton.metric("minisgl_lora_adapters_resident") >= 2
