"""Request parsing of the Triton adapter, without a server (minisgl_backend.triton.parsing)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minisgl_backend.messages import ErrorKind, FinishReason
from minisgl_backend.router import StreamOutput
from minisgl_backend.triton.contract import INPUTS, OUTPUTS
from minisgl_backend.triton.parsing import RequestError, parse_request
from minisgl_backend.triton.repository import read_parameters, set_parameters
from minisgl_backend.triton.responses import ResponseAssembler


def text(s: str | bytes) -> np.ndarray:
    return np.array([s.encode() if isinstance(s, str) else s], dtype=np.object_)


def parse(tensors: dict | None = None, parameters: dict | str | None = None, vocab_size: int | None = 1000):
    tensors = {"text_input": text("hello"), **(tensors or {})}
    tensors = {k: v for k, v in tensors.items() if v is not None}
    params = json.dumps(parameters) if isinstance(parameters, dict) else parameters
    return parse_request(tensors.get, params, vocab_size)


# ---------------------------------------------------------------- good requests


def test_defaults():
    req = parse()
    assert req.prompt == "hello" and req.prompt_text == "hello"
    assert not req.stream and not req.exclude_input_in_output
    assert req.params.max_tokens == 16 and req.params.temperature == 1.0


def test_sampling_parameters_json_with_string_numbers():
    req = parse({"sampling_parameters": text('{"max_tokens": "7", "temperature": "0.5", "top_k": 3, '
                                             '"stop": "x", "seed": "42", "ignore_eos": "true"}')})
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_k, p.stop, p.seed, p.ignore_eos) == (7, 0.5, 3, ["x"], 42, True)


def test_request_parameters_and_switches():
    req = parse(parameters={"max_tokens": 9, "top_p": 0.9, "stream": True, "exclude_input_in_output": "true",
                            "triton_enable_empty_final_response": True})
    assert req.params.max_tokens == 9 and req.params.top_p == pytest.approx(0.9)
    assert req.stream and req.exclude_input_in_output


def test_flat_tensors():
    req = parse({"max_tokens": np.array([5], np.int32), "temperature": np.array([0.0], np.float32),
                 "top_k": np.array([4], np.int32), "seed": np.array([123], np.int64),
                 "ignore_eos": np.array([True]), "stop": np.array([b"a", b"bc"], dtype=np.object_),
                 "stop_token_ids": np.array([1, 2], np.int32)})
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_k, p.seed, p.ignore_eos) == (5, 0.0, 4, 123, True)
    assert p.stop == ["a", "bc"] and p.stop_token_ids == [1, 2]


def test_precedence_flat_then_parameters_then_json():
    req = parse({"max_tokens": np.array([1], np.int32), "sampling_parameters": text('{"max_tokens": 3}')},
                parameters={"max_tokens": 2, "temperature": 0.25})
    assert req.params.max_tokens == 3 and req.params.temperature == 0.25


def test_bool_switches():
    req = parse({"stream": np.array([True]), "return_finish_reason": np.array([True]),
                 "return_num_input_tokens": np.array([True]), "return_num_output_tokens": np.array([False]),
                 "return_logprobs": np.array([True])})
    assert req.stream and req.return_finish_reason and req.return_num_input_tokens
    assert not req.return_num_output_tokens
    assert req.return_logprobs and req.params.logprobs


def test_input_ids_int32_and_int64():
    for dtype in (np.int32, np.int64):
        req = parse({"text_input": None, "input_ids": np.array([1, 2, 3], dtype)})
        assert req.prompt == [1, 2, 3] and req.prompt_text is None


def test_neutral_vllm_keys_are_accepted():
    req = parse({"sampling_parameters": text('{"n": 1, "best_of": null, "skip_special_tokens": true, '
                                             '"max_tokens": 4}')})
    assert req.params.max_tokens == 4


def test_text_as_numpy_str_and_2d_shape():
    assert parse({"text_input": np.array([["hi"]], dtype=np.object_)}).prompt == "hi"


def test_empty_sampling_parameters_string():
    assert parse({"sampling_parameters": text("")}).params.max_tokens == 16


# ---------------------------------------------------------------- bad requests


BAD = {
    "invalid JSON": ({"sampling_parameters": text("{max_tokens: 3")}, None, "not valid JSON"),
    "JSON not an object": ({"sampling_parameters": text("[1, 2]")}, None, "JSON object"),
    "unknown sampling key": ({"sampling_parameters": text('{"max_tokenz": 3}')}, None, "max_tokenz"),
    "unknown request parameter": ({}, {"colour": "red"}, "colour"),
    "out of range temperature": ({"sampling_parameters": text('{"temperature": -0.5}')}, None, "temperature"),
    "out of range top_p": ({}, {"top_p": 0}, "top_p"),
    "max_tokens zero": ({"max_tokens": np.array([0], np.int32)}, None, "max_tokens"),
    "number that does not parse": ({"sampling_parameters": text('{"max_tokens": "many"}')}, None, "max_tokens"),
    "fractional integer": ({}, {"max_tokens": 2.5}, "max_tokens"),
    "string parameter that does not parse": ({}, {"temperature": "hot"}, "temperature"),
    "bool that does not parse": ({}, {"stream": "maybe"}, "stream"),
    "NaN temperature": ({"temperature": np.array([np.nan], np.float32)}, None, "temperature"),
    "wrong tensor type for flat": ({"max_tokens": np.array([1.5], np.float32)}, None, "max_tokens"),
    "wrong tensor type for switch": ({"stream": np.array([1], np.int32)}, None, "BOOL"),
    "wrong tensor type for text": ({"text_input": np.array([1], np.int32)}, None, "STRING"),
    "two prompts": ({"text_input": np.array([b"a", b"b"], dtype=np.object_)}, None, "exactly one"),
    "non-UTF-8 text": ({"text_input": text(b"\xff\xfeabc")}, None, "UTF-8"),
    "empty text": ({"text_input": text("")}, None, "empty"),
    "no prompt": ({"text_input": None}, None, "text_input"),
    "empty input_ids": ({"text_input": None, "input_ids": np.array([], np.int32)}, None, "empty"),
    "negative input_ids": ({"text_input": None, "input_ids": np.array([1, -2], np.int32)}, None, "negative"),
    "input_ids outside vocab": ({"text_input": None, "input_ids": np.array([1, 5000], np.int32)}, None, "vocabulary"),
    "float input_ids": ({"text_input": None, "input_ids": np.array([1.0], np.float32)}, None, "integer"),
    "unsupported vLLM key value": ({"sampling_parameters": text('{"n": 2}')}, None, "'n'"),
    "min_tokens above max_tokens": ({}, {"max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    "stop of wrong type": ({"sampling_parameters": text('{"stop": 5}')}, None, "stop"),
    "request parameters not JSON": ({}, "{nope", "JSON"),
    "100k-deep sampling_parameters": ({"sampling_parameters": text("[" * 100_000 + "]" * 100_000)}, None,
                                      "sampling_parameters is nested too deeply"),
    "100k-deep value inside sampling_parameters": (
        {"sampling_parameters": text('{"stop": ' + "[" * 100_000 + "]" * 100_000 + "}")}, None,
        "sampling_parameters is nested too deeply"),
    "100k-deep request parameters": ({}, '{"stop": ' + "[" * 100_000 + "]" * 100_000 + "}",
                                     "request parameters is nested too deeply"),
    "lone surrogate in sampling_parameters": ({"sampling_parameters": text(r'{"stop": ["ok", "\ud800"]}')}, None,
                                              "sampling_parameters['stop'][1] holds a lone UTF-16 surrogate"),
    "lone surrogate in a sampling key": ({"sampling_parameters": text(r'{"\udc00": 1}')}, None,
                                         "a key of sampling_parameters holds a lone UTF-16 surrogate"),
    "lone surrogate in request parameters": ({}, r'{"stop": "a\udfffb"}',
                                             "request parameters['stop'] holds a lone UTF-16 surrogate"),
    "lone surrogate in a str text_input": ({"text_input": np.array(["a\ud800"], dtype=np.object_)}, None,
                                           "text_input holds a lone UTF-16 surrogate"),
    "text_input and input_ids together": ({"input_ids": np.array([1, 2], np.int32)}, None,
                                          "both text_input and input_ids: send one of them"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_raise_actionable_errors(case):
    tensors, parameters, needle = BAD[case]
    with pytest.raises(RequestError) as info:
        parse(tensors, parameters)
    assert needle in str(info.value)
    assert len(str(info.value)) < 2000, "the message must not echo a huge hostile value"


def test_request_parameters_mapping_with_lone_surrogate():
    with pytest.raises(RequestError, match="request parameters\\['stop'\\] holds a lone UTF-16 surrogate"):
        parse_request({"text_input": text("hi")}.get, {"stop": "\ud800"}, 1000)


def test_paired_surrogate_escape_is_accepted():
    req = parse({"sampling_parameters": text(r'{"stop": "\ud83d\ude00"}')})
    assert req.params.stop == ["\U0001f600"]


# ---------------------------------------------------------------- responses


def _out(text, ids, finished=False, reason=None, n_out=0, logprobs=None):
    return StreamOutput(rid=1, text=text, token_ids=ids, finished=finished,
                        finish_reason=FinishReason(reason) if reason else None,
                        num_input_tokens=3, num_output_tokens=n_out, logprobs=logprobs)


def _text(reply):
    return reply.outputs["text_output"][0].decode()


def test_streaming_replies_hold_back_empty_pieces():
    req = parse({"stream": np.array([True]), "return_num_output_tokens": np.array([True]),
                 "return_finish_reason": np.array([True])})
    asm = ResponseAssembler(req)
    assert [_text(r) for r in asm.on_output(_out("a", [1], n_out=1))] == ["a"]
    assert asm.on_output(_out("", [2], n_out=2)) == []  # half a character: nothing to send yet
    (r,) = asm.on_output(_out("b", [3], n_out=3))
    assert _text(r) == "b" and int(r.outputs["num_output_tokens"][0]) == 2 and not r.final
    assert r.outputs["finish_reason"][0] == b""
    (last,) = asm.on_output(_out("", [4], finished=True, reason="length", n_out=4))
    assert last.final and _text(last) == "" and last.outputs["finish_reason"][0] == b"length"
    assert int(last.outputs["num_output_tokens"][0]) == 1
    assert asm.on_output(_out("x", [5], finished=True, reason="stop")) == []


def test_non_streaming_single_reply_with_prompt():
    asm = ResponseAssembler(parse({"return_logprobs": np.array([True])}))
    assert asm.on_output(_out("a", [1], n_out=1, logprobs=[-0.5])) == []
    (r,) = asm.on_output(_out("b", [2], finished=True, reason="stop", n_out=2, logprobs=[-1.0]))
    assert r.final and _text(r) == "helloab"
    assert json.loads(r.outputs["logprobs"][0]) == [-0.5, -1.0]
    assert set(r.outputs) == {"text_output", "logprobs"}


def test_non_streaming_exclude_input():
    asm = ResponseAssembler(parse({"exclude_input_in_output": np.array([True])}))
    (r,) = asm.on_output(_out("ab", [1, 2], finished=True, reason="length", n_out=2))
    assert _text(r) == "ab"


def test_abort_and_error_replies():
    (r,) = ResponseAssembler(parse()).on_output(_out("", [], finished=True, reason="abort"))
    assert r.final and r.error_code == "CANCELLED"
    out = _out("", [], finished=True, reason="error")
    out.error = "boom"
    (r,) = ResponseAssembler(parse({"stream": np.array([True])})).on_output(out)
    assert r.final and r.error_code == "INTERNAL" and r.error_message == "boom"


@pytest.mark.parametrize("kind,code", [("invalid_request", "INVALID_ARG"), ("overloaded", "UNAVAILABLE"),
                                       ("engine_failure", "INTERNAL"), ("request_failure", "INTERNAL")])
def test_engine_error_kinds_map_to_triton_codes(kind, code):
    out = _out("", [], finished=True, reason="error")
    out.error, out.error_kind = "why", ErrorKind(kind)
    (r,) = ResponseAssembler(parse()).on_output(out)
    assert r.final and r.error_code == code and r.error_message == "why"


# ---------------------------------------------------------------- config.pbtxt


def test_config_pbtxt_matches_contract():
    from pathlib import Path

    pbtxt = (Path(__file__).resolve().parents[1] / "model_repository" / "minisgl" / "config.pbtxt").read_text()
    assert 'backend: "python"' in pbtxt and "max_batch_size: 0" in pbtxt
    assert "decoupled: true" in pbtxt and "KIND_MODEL" in pbtxt
    for spec in INPUTS + OUTPUTS:
        assert f'name: "{spec.name}"' in pbtxt, spec.name
        line = next(l for l in pbtxt.splitlines() if f'name: "{spec.name}"' in l)
        assert spec.data_type in line, (spec.name, line)
    params = read_parameters(pbtxt)
    from minisgl_backend.config import AdapterConfig, EngineConfig, adapter_setting_names
    from minisgl_backend.triton.adapter import split_parameters

    engine, adapter = split_parameters({"parameters": {k: {"string_value": v} for k, v in params.items()}})
    assert engine["model_path"] == ""
    known = EngineConfig().to_flat()
    assert set(engine) <= set(known) | {"model_path"}
    assert set(params) <= set(known) | adapter_setting_names()  # every key exists in the config tree
    assert {"tp_size", "dtype", "device", "page_size", "max_total_tokens", "prefill_budget", "chunk_size",
            "max_running_requests", "enable_overlap"} <= set(engine)
    assert set(params) & adapter_setting_names() == {"cancel_poll_interval_ms", "stats_interval_ms",
                                                      "cancel_grace_s"}
    assert adapter == AdapterConfig.from_flat({k: params[k] for k in adapter_setting_names()})


def test_set_parameters_overrides_and_adds():
    pbtxt = 'parameters: { key: "tp_size" value: { string_value: "1" } }\n'
    out = set_parameters(pbtxt, {"tp_size": 2, "model_path": '/m/"x"'})
    assert read_parameters(out) == {"tp_size": "2", "model_path": '/m/"x"'}
