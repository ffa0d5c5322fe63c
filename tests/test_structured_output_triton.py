"""Structured output through a real tritonserver: gRPC streaming and HTTP /generate, and bad
constraints answered with INVALID_ARG while the other requests are served."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from minisgl_backend.testing.triton import GrpcStream, grpc_inputs

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600)]

SETTINGS = {"max_total_tokens": 4096, "page_size": 16, "max_running_requests": 32}
REGEX = "[0-9]{3}-[a-z]{2}"
SCHEMA = {"type": "object",
          "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2}},
          "required": ["kind", "age", "tags"]}


@pytest.fixture(scope="module")
def server(triton_server_factory, tiny_llama):
    with triton_server_factory("triton-grammar", {"minisgl": {"model_path": tiny_llama, **SETTINGS}}) as srv:
        yield srv


def _sampling(constraint: dict | None, seed: int) -> str:
    body = {"max_tokens": 64, "temperature": 1.0, "seed": seed}
    if constraint is not None:
        body["structured_outputs"] = constraint
    return json.dumps(body)


def test_grpc_streaming_constraints(server):
    cases = {"choice": ({"choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
             "regex": ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
             "json": ({"json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
             "free": (None, None)}
    client = GrpcStream(server.grpc_url)
    try:
        for seed, (rid, (constraint, _)) in enumerate(cases.items()):
            client.send(rid, grpc_inputs("Hello there", stream=True, exclude_input_in_output=True,
                                         return_finish_reason=True,
                                         sampling_parameters=_sampling(constraint, seed)))
        got = client.collect(list(cases))
        # a stream error names neither request id nor code (HTTP shows the 400): it goes alone
        client.send("bad", grpc_inputs("Hello there", stream=True, sampling_parameters=_sampling({"regex": "[0-9"}, 0)))
        bad = client.collect(["bad"])["bad"]
    finally:
        client.close()
    assert "structured_outputs.regex does not compile" in str(bad["error"]) and "Unclosed" in str(bad["error"])
    for rid, (_, check) in cases.items():
        assert got[rid]["error"] is None, got[rid]["error"]
        reason = got[rid]["outputs"][-1]["finish_reason"][0]
        text = "".join(got[rid]["texts"])
        if check is not None:
            assert reason == b"stop" and check(text), (rid, text, reason)


def test_http_generate_with_guided_keys_and_structured_outputs(server):
    status, body = server.generate({"text_input": "The weather", "parameters": {
        "max_tokens": 64, "temperature": 0, "exclude_input_in_output": True, "return_finish_reason": True,
        "guided_regex": REGEX}})
    assert status == 200, body
    assert re.fullmatch(REGEX, body["text_output"]) and body["finish_reason"] == "stop", body
    status, body = server.generate({"text_input": "The weather", "exclude_input_in_output": True,
                                    "sampling_parameters": _sampling({"json": SCHEMA}, 7)})
    assert status == 200, body
    jsonschema.validate(json.loads(body["text_output"]), SCHEMA)


def test_http_bad_constraints_are_invalid_arg(server):
    status, body = server.generate({"text_input": "x", "sampling_parameters": json.dumps(
        {"structured_outputs": {"regex": "a", "choice": ["b"]}})})
    assert status == 400 and "structured_outputs needs exactly one" in body["error"], body
    status, body = server.generate({"text_input": "x", "parameters": {"guided_json": json.dumps({"type": "foo"})}})
    assert status == 400 and "structured_outputs.json does not compile" in body["error"], body
    status, body = server.generate({"text_input": "x", "parameters": {"max_tokens": 4, "temperature": 0}})
    assert status == 200, "the server keeps serving"
