"""The OpenAI frontend's pure parts (no server): chat templating, logprob tokens, the two
logprobs formats of the contract, request models, error shapes."""

from __future__ import annotations

import json

import pytest

from minisgl_backend.openai.app import _validation_to_openai
from minisgl_backend.openai.chat import ChatRenderer
from minisgl_backend.openai.errors import OpenAIError
from minisgl_backend.openai.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from minisgl_backend.openai.triton_client import _logprobs


class _BosTokenizer:
    """A tokenizer that adds BOS itself, with a template that writes it too."""

    bos_token, bos_token_id = "<s>", 1
    chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, turns, chat_template, tokenize, add_generation_prompt):
        import jinja2

        return jinja2.Template(chat_template).render(messages=turns, bos_token=self.bos_token)


def test_render_cuts_the_bos_the_model_adds_again():
    renderer = ChatRenderer(_BosTokenizer())
    text = renderer.render([ChatMessage(role="developer", content="be brief"),
                            ChatMessage(role="user", content=[{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}])])
    assert text == "[system]be brief[user]a\nb"


def test_no_chat_template_is_a_400_naming_the_option():
    tok = _BosTokenizer()
    tok.chat_template = None
    with pytest.raises(OpenAIError) as info:
        ChatRenderer(tok).render([ChatMessage(role="user", content="hi")])
    assert info.value.status == 400 and "--chat-template" in info.value.message


def test_token_strings_split_or_fall_back_to_the_first_token():
    renderer = ChatRenderer(_BosTokenizer())
    assert renderer.token_strings("abc", 3) == ["a", "b", "c"]
    assert renderer.token_strings("abc", 2) == ["abc", ""]  # cannot split: the text stays whole
    assert renderer.token_strings("", 1) == [""]
    assert renderer.token_strings("x", 0) == []


def test_logprobs_in_both_formats():
    assert _logprobs("[-0.5, -1.25]") == ([-0.5, -1.25], None, None)
    vllm = ('[{"17": {"logprob": -0.1, "rank": 1, "decoded_token": " Paris"}}, '
            '{"3": {"logprob": -2.0, "rank": 2}, "9": {"logprob": -0.2, "rank": 1, "decoded_token": "x"}}]')
    assert _logprobs(vllm) == ([-0.1, -2.0], [" Paris", ""],
                               [[(" Paris", -0.1, 1)], [("", -2.0, 2), ("x", -0.2, 1)]])
    assert _logprobs("") == ([], None, None)


def test_sampling_parameters_carry_only_what_was_set():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], stop="END", top_k=5,
                                seed=3, max_completion_tokens=7)
    assert req.requested_max_tokens() == 7
    assert req.sampling_parameters(7) == {"max_tokens": 7, "seed": 3, "top_k": 5, "stop": ["END"]}


@pytest.mark.parametrize("fields, param", [({"n": 0}, "n"), ({"n": 129}, "n"),
                                           ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                                           ({"top_logprobs": 3}, "top_logprobs"),
                                           ({"logit_bias": {"x": 1}}, "logit_bias"),
                                           ({"logit_bias": {"5": 101}}, "logit_bias"),
                                           ({"functions": [{"name": "f"}]}, "functions")])
def test_bad_chat_fields_are_named(fields, param):
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **fields)
    error = req.unsupported()
    assert error is not None and error.status == 400 and error.param == param


def test_tools_top_logprobs_n_and_logit_bias_reach_the_engine():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], n=3, logprobs=True,
                                top_logprobs=2, logit_bias={"5": -100})
    assert req.unsupported() is None and req.num_choices == 3
    assert req.sampling_parameters(4) == {"max_tokens": 4, "logit_bias": {"5": -100.0}, "logprobs": 2}


def test_completion_prompt_forms():
    assert CompletionRequest(model="m", prompt="hi").prompts() == ["hi"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=[[1, 2]]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=["hi", "yo"]).prompts() == ["hi", "yo"]
    assert CompletionRequest(model="m", prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    for empty, where in (("", "prompt"), (["a", ""], "prompt.1"), ([[1], []], "prompt.1")):
        with pytest.raises(OpenAIError) as info:
            CompletionRequest(model="m", prompt=empty).prompts()
        assert info.value.param == where
    with pytest.raises(OpenAIError):
        CompletionRequest(model="m", prompt=["a"] * 65, n=2).prompts()


def test_validation_errors_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    error = _validation_to_openai(info.value.errors())
    assert error.status == 400 and error.param.startswith("messages.0.content.0")
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], max_tokens="many")
    error = _validation_to_openai(info.value.errors())
    assert error.param == "max_tokens" and "invalid value" in error.message


# ---------------------------------------------------------------- lenient fields, router extras

# what the SGLang Model Gateway (sglang-router 0.3.2) sends for a plain request (captured from it)
ROUTER_CHAT = {"messages": [{"role": "user", "content": "hi"}], "model": "m", "logprobs": False,
               "max_completion_tokens": 4, "stream": False, "no_stop_trim": False, "ignore_eos": False,
               "continue_final_message": False, "skip_special_tokens": True, "separate_reasoning": True,
               "stream_reasoning": True, "return_hidden_states": False}
ROUTER_COMPLETION = {"model": "m", "prompt": "hi", "max_tokens": 4, "stream": False, "echo": False,
                     "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True,
                     "return_hidden_states": False}


def test_the_routers_extras_at_their_neutral_values_are_accepted_and_change_nothing():
    chat = ChatCompletionRequest(**ROUTER_CHAT)
    assert chat.unsupported() is None and chat.ignored_fields() == []
    assert chat.sampling_parameters(4) == {"max_tokens": 4, "ignore_eos": False}
    assert chat.template_switches() == {"add_generation_prompt": True, "continue_final_message": False}
    completion = CompletionRequest(**ROUTER_COMPLETION)
    assert completion.unsupported() is None and completion.ignored_fields() == []
    assert completion.sampling_parameters(4) == {"max_tokens": 4, "ignore_eos": False}


@pytest.mark.parametrize("field, value", [("no_stop_trim", True), ("skip_special_tokens", False),
                                          ("return_hidden_states", True), ("include_stop_str_in_output", True),
                                          ("use_beam_search", True), ("prompt_logprobs", 2),
                                          ("spaces_between_special_tokens", False)])
def test_extras_asking_for_what_this_server_cannot_do_are_refused_by_name(field, value):
    for request in (ChatCompletionRequest(**{**ROUTER_CHAT, field: value}),
                    CompletionRequest(**{**ROUTER_COMPLETION, field: value})):
        error = request.unsupported()
        assert error is not None and error.status == 400 and error.param == field, error
        assert f"{field}={json.dumps(value)}" in error.message


def test_reasoning_switches_take_either_value():
    """No reasoning parser: separating or streaming reasoning changes nothing, so both values are fine."""
    for value in (True, False):
        request = ChatCompletionRequest(**{**ROUTER_CHAT, "separate_reasoning": value, "stream_reasoning": value})
        assert request.unsupported() is None


def test_unknown_fields_are_ignored_and_named_with_their_place():
    request = ChatCompletionRequest(model="m", store=True, metadata={"a": "b"}, stream=True,
                                    stream_options={"include_usage": True, "extra_flag": 1},
                                    messages=[{"role": "user", "content": "x", "weight": 2}])
    assert request.unsupported() is None
    assert sorted(request.ignored_fields()) == ["messages.0.weight", "metadata", "store", "stream_options.extra_flag"]
    assert "store" not in request.sampling_parameters(3)


def test_continue_final_message():
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "The answer is"}]
    request = ChatCompletionRequest(model="m", messages=messages, continue_final_message=True)
    assert request.unsupported() is None  # SGLang sends no add_generation_prompt: its default gives way
    assert request.template_switches() == {"add_generation_prompt": False, "continue_final_message": True}
    both = ChatCompletionRequest(model="m", messages=messages, continue_final_message=True,
                                 add_generation_prompt=True)
    assert both.unsupported().param == "continue_final_message"
    no_prompt = ChatCompletionRequest(model="m", messages=messages, add_generation_prompt=False)
    assert no_prompt.template_switches() == {"add_generation_prompt": False, "continue_final_message": False}


def test_vllm_guided_keys_reach_the_engine_and_conflict_with_response_format():
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                    guided_choice=["yes", "no"])
    assert request.unsupported() is None
    assert request.sampling_parameters(5)["guided_choice"] == ["yes", "no"]
    both = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], guided_regex="a+",
                                 response_format={"type": "json_object"})
    assert both.unsupported().param == "guided_regex"


# ---------------------------------------------------------------- continuous usage in streams


def _events(raw: bytes) -> list:
    return [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]


def test_continuous_usage_puts_the_usage_so_far_on_every_chunk():
    from minisgl_backend.openai.responses import ChatShape, StreamEvents, Usage

    usage = Usage(prompt_tokens=7, completion_tokens=0)
    events = StreamEvents(ChatShape("m"), include_usage=True, continuous_usage=True)
    raw = events.opening(usage)
    usage.completion_tokens = 2
    raw += events.text("ab", None, 0, usage)
    usage.completion_tokens = 3
    raw += events.text("c", None, 2, usage) + events.closing("length", usage)
    chunks = _events(raw)
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 2, 3, 3, 3]
    assert all(c["usage"]["prompt_tokens"] == 7 and c["usage"]["total_tokens"] == 7 + c["usage"][
        "completion_tokens"] for c in chunks)
    assert chunks[-1]["choices"] == [] and raw.endswith(b"data: [DONE]\n\n")
    plain = _events(StreamEvents(ChatShape("m"), include_usage=True).text("ab", None, 0, usage))
    assert plain[0]["usage"] is None  # include_usage alone: usage only in the last chunk


# ---------------------------------------------------------------- gauges, aliases, API key


METRICS = """# HELP minisgl_num_requests_running Requests in the running (decode) set
# TYPE minisgl_num_requests_running gauge
minisgl_num_requests_running{model="minisgl",version="1"} 3
minisgl_num_requests_running{model="other",version="1"} 50
minisgl_num_requests_pending{model="minisgl",version="1"} 2
minisgl_kv_cache_usage_ratio{model="minisgl",version="1"} 0.25
minisgl_kv_pages{model="minisgl",state="total",version="1"} 64
minisgl_kv_pages{model="minisgl",state="free",version="1"} 40
minisgl_kv_pages{model="minisgl",state="cached",version="1"} 8
minisgl_kv_pages{model="minisgl",state="locked",version="1"} 16
nv_inference_count{model="minisgl",version="1"} 9
"""


def test_gauges_and_their_vllm_aliases():
    from minisgl_backend.openai.gateway import ModelGauges, ServedModel, vllm_aliases
    from minisgl_backend.testing.triton import parse_metric

    gauges = ModelGauges.from_text(METRICS, "minisgl")
    assert gauges == ModelGauges(running=3, pending=2, kv_usage=0.25, total_pages=64, used_pages=16)
    text = vllm_aliases(gauges, ServedModel("minisgl", None, {"page_size": "32"}))
    assert parse_metric(text, "vllm:num_requests_running", {"model_name": "minisgl"}) == 3
    assert parse_metric(text, "vllm:num_requests_waiting", {"model_name": "minisgl"}) == 2
    assert parse_metric(text, "vllm:kv_cache_usage_perc", {"model_name": "minisgl"}) == 0.25
    assert parse_metric(text, "vllm:cache_config_info", {"block_size": "32", "num_gpu_blocks": "64"}) == 1
    assert "# TYPE vllm:num_requests_waiting gauge" in text
    default_page = ServedModel("minisgl", None, {"page_size": ""}).page_size
    assert default_page == 16 and ServedModel("minisgl", None, {}).tp_size == 1


def test_default_metrics_url_follows_the_triton_host():
    from minisgl_backend.openai.gateway import default_metrics_url

    assert default_metrics_url("127.0.0.1:8001") == "http://127.0.0.1:8002/metrics"
    assert default_metrics_url("triton.svc:8001") == "http://triton.svc:8002/metrics"
    assert default_metrics_url("[::1]:8001") == "http://[::1]:8002/metrics"


def test_api_key_from_the_flag_or_the_environment(monkeypatch):
    from minisgl_backend.openai.__main__ import parse_args

    monkeypatch.delenv("MINISGL_API_KEY", raising=False)
    assert parse_args([]).api_key is None
    monkeypatch.setenv("MINISGL_API_KEY", "from-env")
    assert parse_args([]).api_key == "from-env"
    assert parse_args(["--api-key", "flag"]).api_key == "flag"
    assert "flag" not in repr(parse_args(["--api-key", "flag"]))
    assert parse_args(["--triton-url", "h:1", "--metrics-url", "http://m:2/metrics"]).metrics_url == "http://m:2/metrics"


def test_api_key_guards_v1_only():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from minisgl_backend.openai.auth import ApiKeyMiddleware

    app = FastAPI()
    for path in ("/v1/models", "/health", "/metrics", "/get_load", "/server_info", "/model_info"):
        app.get(path)(lambda: {"ok": True})
    app.add_middleware(ApiKeyMiddleware, api_key="s3cret")
    client = TestClient(app)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        resp = client.get("/v1/models", headers=headers)
        assert resp.status_code == 401, headers
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json() == {"ok": True}
    for path in ("/health", "/metrics", "/get_load", "/server_info", "/model_info"):
        assert client.get(path).status_code == 200, path
