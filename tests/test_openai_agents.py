"""What agent frameworks and evaluation harnesses send to the OpenAI frontend, through a real
tritonserver on a tiny random model: tool calls forced by the grammar, n choices, batched
prompts, top logprobs, echo with the prompt's logprobs, logit_bias."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from minisgl_backend.testing.openai_frontend import OpenAIFrontend

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600)]

MODEL = "minisgl"
SETTINGS = {"max_total_tokens": 8192, "page_size": 16, "max_running_requests": 64}
GREEDY = {"temperature": 0.0}
IGNORE_EOS = {"ignore_eos": True}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 23}},
                                       "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def triton(triton_server_factory, tiny_llama):
    with triton_server_factory("openai-agents", {MODEL: {"model_path": tiny_llama, **SETTINGS}}) as srv:
        yield srv


@pytest.fixture(scope="module")
def frontend(triton, tmp_path_factory):
    with OpenAIFrontend.beside(triton, tmp_path_factory.mktemp("fe"), "--tool-call-parser", "hermes") as fe:
        yield fe


@pytest.fixture(scope="module")
def client(frontend) -> openai.OpenAI:
    return frontend.sdk_client()


@pytest.fixture(scope="module")
def offline(tiny_llama):
    from minisgl_backend import LLM

    llm = LLM(tiny_llama, **SETTINGS)
    yield llm
    llm.shutdown()


def _schema(tool: dict) -> dict:
    return tool["function"]["parameters"]


# ---------------------------------------------------------------- tools


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_are_valid_on_a_model_that_never_saw_tools(client, choice, parallel):
    """Whatever the random weights pick: one call (parallel_tool_calls=false, then only EOS), or
    calls until max_tokens, every complete one naming a tool with arguments valid for it."""
    tools = {"get_weather": WEATHER, "get_time": TIME}
    answer = client.chat.completions.create(model=MODEL, messages=ASK, tools=list(tools.values()), tool_choice=choice,
                                            n=6, temperature=1.0, seed=11, max_tokens=160,
                                            parallel_tool_calls=parallel)
    assert len(answer.choices) == 6
    for got in answer.choices:
        assert got.finish_reason == ("length" if parallel and got.finish_reason != "tool_calls" else "tool_calls"), got
        assert got.message.tool_calls and (parallel or len(got.message.tool_calls) == 1), got
        for call in got.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            assert call.function.name in tools
            if isinstance(choice, dict):
                assert call.function.name == "get_time"
            jsonschema.validate(json.loads(call.function.arguments), _schema(tools[call.function.name]))


def test_streamed_tool_calls_equal_the_whole_answer(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=160,
                  parallel_tool_calls=False, **GREEDY)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": delta.id, "name": delta.function.name, "arguments": ""})
                call["arguments"] += delta.function.arguments or ""
    assert [c["name"] for c in calls.values()] == [c.function.name for c in whole.message.tool_calls]
    assert [c["arguments"] for c in calls.values()] == [c.function.arguments for c in whole.message.tool_calls]
    assert all(c["id"] for c in calls.values()) and reasons[-1] == "tool_calls"


def test_a_tool_round_trip_renders_and_answers(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=160, **GREEDY).choices[0].message
    call = first.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                            max_tokens=8, extra_body=IGNORE_EOS, **GREEDY)
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.tool_calls is None
    assert answer.usage.completion_tokens == 8


# ---------------------------------------------------------------- n and batched prompts


def test_n_choices_are_seeded_distinct_and_count_the_prompt_once(client):
    kwargs = dict(model=MODEL, messages=ASK, n=3, temperature=1.0, seed=5, max_tokens=8, extra_body=IGNORE_EOS)
    first, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices], "a seed makes the choices reproducible"
    assert len(set(texts)) > 1, "the choices are sampled independently"
    one = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, extra_body=IGNORE_EOS, **GREEDY)
    assert first.usage.prompt_tokens == one.usage.prompt_tokens
    assert first.usage.completion_tokens == 24
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts


def test_batched_prompts_give_one_choice_per_prompt_and_n(client, offline):
    from minisgl_backend import SamplingParams

    for prompts in (["The capital of France is", "a b c"], [[5, 6, 7, 8], [9, 10]]):
        answer = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, extra_body=IGNORE_EOS,
                                           **GREEDY)
        refs = offline.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        assert [c.index for c in answer.choices] == [0, 1, 2, 3]
        assert [c.text for c in answer.choices] == [refs[0]["text"]] * 2 + [refs[1]["text"]] * 2
        assert answer.usage.prompt_tokens == refs[0]["num_input_tokens"] + refs[1]["num_input_tokens"]
        assert answer.usage.completion_tokens == 24


# ---------------------------------------------------------------- logprobs, echo, logit_bias


def test_top_logprobs_equal_the_engines(client, offline):
    from minisgl_backend import SamplingParams

    prompt = "Once upon a time there was"
    ref = offline.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True,
                                                    top_logprobs=3))[0]
    comp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, logprobs=3, extra_body=IGNORE_EOS,
                                     **GREEDY).choices[0].logprobs
    assert comp.token_logprobs == pytest.approx(ref["logprobs"], abs=1e-4)
    for top, want in zip(comp.top_logprobs, ref["top_logprobs"]):  # {text: logprob}: equal texts share a key
        assert max(top.values()) == pytest.approx(want.logprobs[0], abs=1e-4)
        assert all(any(v == pytest.approx(w, abs=1e-4) for w in want.logprobs) for v in top.values())
    content = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, logprobs=True, top_logprobs=2,
                                             extra_body=IGNORE_EOS, **GREEDY).choices[0].logprobs.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5) for c in content), "greedy: the best"


@pytest.mark.parametrize("prompt", ["The quick brown fox jumps over the lazy dog", [9, 8, 7, 6, 5, 4]])
def test_echo_scores_the_prompt_like_transformers(client, tiny_llama, prompt):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = prompt if isinstance(prompt, list) else AutoTokenizer.from_pretrained(tiny_llama).encode(prompt)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = [ref[p, ids[p + 1]].item() for p in range(len(ids) - 1)]
    for max_tokens in (0, 1):
        choice = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, echo=True,
                                           logprobs=1, **GREEDY).choices[0]
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
        assert len(lp.tokens) == len(ids) + max_tokens
        if isinstance(prompt, str):
            assert choice.text.startswith(prompt) and (max_tokens or choice.text == prompt)


def test_logit_bias_forces_a_token(client, tiny_llama):
    from transformers import AutoTokenizer

    token = AutoTokenizer.from_pretrained(tiny_llama).encode("fox", add_special_tokens=False)[0]
    answer = client.completions.create(model=MODEL, prompt="a b c", max_tokens=4, logit_bias={str(token): 100},
                                       logprobs=0, extra_body=IGNORE_EOS, **GREEDY).choices[0]
    assert answer.logprobs.tokens == [AutoTokenizer.from_pretrained(tiny_llama).decode([token])] * 4


def test_an_empty_body_says_so(frontend):
    response = httpx.post(f"{frontend.base_url}/v1/chat/completions", content=b"",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert "the request body is empty" in response.json()["error"]["message"]


def test_cancelling_n_streamed_choices_frees_every_page(client, triton):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, n=3, max_tokens=2000, stream=True,
                                            extra_body=IGNORE_EOS, **GREEDY)
    seen = set()
    for chunk in stream:
        seen.update(c.index for c in chunk.choices)
        if len(seen) == 3:
            break
    stream.close()
    triton.wait_idle()


def test_a_lone_surrogate_is_a_400_naming_its_field(frontend):
    body = b'{"model": "minisgl", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    response = httpx.post(f"{frontend.base_url}/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages.0.content" and "surrogate" in error["message"]
