"""The OpenAI-compatible frontend (`python -m minisgl_backend.openai`) in front of a real
tritonserver, driven with the official `openai` SDK.

One tritonserver (tiny random Llama whose tokenizer has a ChatML template) and one frontend
subprocess per module, both on free ports.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time

import httpx
import openai
import pytest

from minisgl_backend.openai.app import ServerSettings
from minisgl_backend.ports import free_port
from minisgl_backend.testing.openai_frontend import InProcessFrontend, OpenAIFrontend
from minisgl_backend.testing.triton import TritonServer, parse_metric

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600)]

MODEL = "minisgl"
MAX_TOKENS = 12
SETTINGS = {"max_total_tokens": 8192, "page_size": 16, "max_running_requests": 128}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Tell me a joke"}],
]
PROMPTS = ["The capital of France is", "Once upon a time there was"]
GREEDY = {"temperature": 0.0}
IGNORE_EOS = {"ignore_eos": True}  # a vLLM/SGLang extra: fixed lengths on a random model


@pytest.fixture(scope="module")
def triton(triton_server_factory, tiny_llama):
    with triton_server_factory("openai", {MODEL: {"model_path": tiny_llama, **SETTINGS}}) as srv:
        yield srv


@pytest.fixture(scope="module")
def frontend(triton, tmp_path_factory):
    """The real command line; no --tokenizer: the chat template comes from the model's model_path.
    tritonserver's metrics port is a free port here, not 8002: --metrics-url names it."""
    with OpenAIFrontend.beside(triton, tmp_path_factory.mktemp("fe")) as fe:
        yield fe


@pytest.fixture(scope="module")
def client(frontend) -> openai.OpenAI:
    return frontend.sdk_client()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def chat_prompts(tokenizer) -> list[str]:
    tok = tokenizer
    return [tok.apply_chat_template([_flat(m) for m in conv], tokenize=False, add_generation_prompt=True)
            for conv in CONVERSATIONS]


def _flat(message: dict) -> dict:
    content = message["content"]
    if isinstance(content, list):
        content = "\n".join(part["text"] for part in content)
    return {**message, "content": content}


@pytest.fixture(scope="module")
def offline(tiny_llama, chat_prompts):
    """Reference outputs of the offline LLM on the same weights: {(prompt, params key): result}."""
    from minisgl_backend import LLM, SamplingParams

    llm = LLM(tiny_llama, **SETTINGS)
    cache: dict = {}

    def generate(prompt, **params):
        key = (json.dumps(prompt), json.dumps(params, sort_keys=True))
        if key not in cache:
            cache[key] = llm.generate([prompt], SamplingParams(**params))[0]
        return cache[key]

    yield generate
    llm.shutdown()


def greedy_ref(offline, prompt, max_tokens=MAX_TOKENS, **extra):
    return offline(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)


# ---------------------------------------------------------------- endpoints


def test_models_and_health(client, frontend):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    resp = httpx.get(f"{frontend.base_url}/health")
    assert resp.status_code == 200


def test_chat_greedy_stream_equals_nonstream_equals_offline(client, offline, chat_prompts, tokenizer):
    for conv, prompt in zip(CONVERSATIONS, chat_prompts):
        ref = greedy_ref(offline, prompt)
        whole = client.chat.completions.create(model=MODEL, messages=conv, max_tokens=MAX_TOKENS, extra_body=IGNORE_EOS,
                                               **GREEDY)
        choice = whole.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content == ref["text"]
        assert choice.finish_reason == ref["finish_reason"] == "length"
        assert whole.usage.completion_tokens == len(ref["token_ids"]) == MAX_TOKENS
        assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

        chunks = list(client.chat.completions.create(model=MODEL, messages=conv, max_tokens=MAX_TOKENS, stream=True,
                                                     stream_options={"include_usage": True},
                                                     extra_body=IGNORE_EOS, **GREEDY))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == ref["text"]
        assert chunks[0].choices[0].delta.role == "assistant"
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert all(c.usage is None for c in chunks[:-1])
        assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_completions_text_and_token_ids(client, offline, tokenizer):
    tok = tokenizer
    for prompt in PROMPTS:
        ref = greedy_ref(offline, prompt)
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, extra_body=IGNORE_EOS,
                                          **GREEDY)
        assert whole.choices[0].text == ref["text"]
        assert whole.choices[0].finish_reason == "length"
        assert whole.usage.completion_tokens == MAX_TOKENS
        assert whole.usage.prompt_tokens == len(tok.encode(prompt))
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, stream=True,
                                                stream_options={"include_usage": True}, extra_body=IGNORE_EOS,
                                                **GREEDY))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref["text"]
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS
        ids = tok.encode(prompt)
        by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, extra_body=IGNORE_EOS,
                                           **GREEDY)
        assert by_ids.choices[0].text == greedy_ref(offline, ids)["text"]
        assert by_ids.usage.prompt_tokens == len(ids)


def test_raw_sse_ends_with_done(frontend):
    body = {"model": MODEL, "messages": CONVERSATIONS[0], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{frontend.base_url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        assert json.loads(e[len("data: "):])["object"] == "chat.completion.chunk"


# ---------------------------------------------------------------- sampling fields


def test_every_sampling_field_reaches_the_engine(client, offline, chat_prompts):
    """One request with every sampling field equals the offline engine with the same settings."""
    fields = {"temperature": 0.0, "top_p": 0.5, "presence_penalty": 0.5, "frequency_penalty": 0.7}
    extras = {"top_k": 4, "min_p": 0.01, "repetition_penalty": 1.3, "min_tokens": 3, "ignore_eos": True}
    ref = offline(chat_prompts[0], max_tokens=MAX_TOKENS, **fields, **extras)
    plain = greedy_ref(offline, chat_prompts[0])
    assert ref["text"] != plain["text"], "the penalties should change this output (else the test proves nothing)"
    got = client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_completion_tokens=MAX_TOKENS,
                                         extra_body=extras, **fields)
    assert got.choices[0].message.content == ref["text"]
    # stop_token_ids: the first greedy token ends the request at once
    first = plain["token_ids"][0]
    stopped = client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=MAX_TOKENS,
                                             extra_body={"stop_token_ids": [first]}, **GREEDY)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 1
    # max_completion_tokens wins over max_tokens, as in OpenAI's API
    short = client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=9,
                                           max_completion_tokens=3, extra_body=IGNORE_EOS, **GREEDY)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_seed_reproducible(client, offline, chat_prompts):
    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=MAX_TOKENS,
                                              temperature=1.0, seed=seed, extra_body=IGNORE_EOS).choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert first == offline(chat_prompts[0], max_tokens=MAX_TOKENS, temperature=1.0, seed=7, ignore_eos=True)["text"]
    assert len({first, sample(8), sample(9)}) > 1


def test_stop_strings(client, offline, chat_prompts):
    ref = greedy_ref(offline, chat_prompts[0])["text"]
    stop = ref[4:6]
    expected = ref[:ref.index(stop)]
    for stream in (False, True):
        kwargs = dict(model=MODEL, messages=CONVERSATIONS[0], max_tokens=MAX_TOKENS, stop=[stop, "never here"],
                      extra_body=IGNORE_EOS, **GREEDY)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = chunks[-1].choices[0].finish_reason
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
            text, reason = choice.message.content, choice.finish_reason
        assert text == expected and reason == "stop", (stream, text, expected)
    done = client.completions.create(model=MODEL, prompt=chat_prompts[0], max_tokens=MAX_TOKENS, stop=stop,
                                     extra_body=IGNORE_EOS, **GREEDY)
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "stop"


def test_logprobs(client, offline, chat_prompts):
    ref = offline(chat_prompts[0], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=True)
    assert len(ref["logprobs"]) == MAX_TOKENS
    got = client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=MAX_TOKENS, logprobs=True,
                                         top_logprobs=0, extra_body=IGNORE_EOS, **GREEDY)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens == MAX_TOKENS
    assert [c.logprob for c in content] == pytest.approx(ref["logprobs"], abs=1e-4)
    assert "".join(c.token for c in content) == got.choices[0].message.content == ref["text"]
    chunks = list(client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=MAX_TOKENS,
                                                 logprobs=True, stream=True, extra_body=IGNORE_EOS, **GREEDY))
    streamed = [c.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx(ref["logprobs"], abs=1e-4)
    comp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, logprobs=0,
                                     extra_body=IGNORE_EOS, **GREEDY)
    lp = comp.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.text_offset) == MAX_TOKENS
    assert all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens) == comp.choices[0].text


# ---------------------------------------------------------------- errors


BAD_CHAT = {
    "n of 0": ({"n": 0}, "n"),
    "tool without a valid schema": ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 5}}}}}]}, "tools"),
    "tool_choice naming an unknown tool": ({"tools": [{"type": "function", "function": {"name": "f"}}],
                                            "tool_choice": {"type": "function", "function": {"name": "g"}}},
                                           "tool_choice"),
    "tool_choice without tools": ({"tool_choice": "required"}, "tool_choice"),
    "top_logprobs above 20": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "negative temperature (engine)": ({"temperature": -1}, "temperature"),
    "top_p out of range (engine)": ({"top_p": 1.5}, "top_p"),
    "max_tokens 0 (engine)": ({"max_tokens": 0}, "max_tokens"),
    "min_tokens above max_tokens (engine)": ({"max_tokens": 2, "extra_body": {"min_tokens": 5}}, "min_tokens"),
    "presence_penalty out of range (engine)": ({"presence_penalty": 3}, "presence_penalty"),
    "temperature not a number": ({"extra_body": {"temperature": "hot"}}, "temperature"),
    "router extra at a value it cannot give": ({"extra_body": {"no_stop_trim": True}}, "no_stop_trim"),
    "image content part": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages.0.content"),
    "unknown role": ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    "no messages": ({"messages": []}, "messages"),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, "stream_options"),
    "logit_bias out of range": ({"logit_bias": {"5": 200}}, "logit_bias"),
    "logit_bias outside the vocabulary (engine)": ({"logit_bias": {"1000000": 5}}, "logit_bias"),
    "response_format of an unknown type": ({"response_format": {"type": "xml"}}, "response_format"),
    "response_format json_schema without a schema object": (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}}, "response_format"),
    "stop_token_ids outside int32 (engine)": ({"extra_body": {"stop_token_ids": [-3]}}, "stop_token_ids"),
    "empty stop string (engine)": ({"stop": [""]}, "stop"),
    "conversation longer than the context (engine)": ({"messages": [{"role": "user", "content": "a b " * 3000}]},
                                                      "context"),
}

BAD_COMPLETIONS = {  # (fields, a word of the message, the error's param)
    "logprobs above 20": ({"logprobs": 21}, "logprobs", "logprobs"),
    "token id outside the vocabulary (engine)": ({"prompt": [1, 2, 10**6]}, "vocabulary", "prompt"),
    "prompt longer than the context (engine)": ({"prompt": [5] * 9000}, "context", "prompt"),
    "an empty prompt among two": ({"prompt": ["a", ""]}, "prompt", "prompt.1"),
    "empty prompt": ({"prompt": ""}, "prompt", "prompt"),
    "max_tokens 0 without echo": ({"max_tokens": 0}, "echo", "max_tokens"),
    "best_of": ({"best_of": 3}, "best_of", "best_of"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHAT))
def test_chat_bad_input_is_400(client, case):
    kwargs, needle = BAD_CHAT[case]
    request = {"model": MODEL, "messages": CONVERSATIONS[0], "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    _check_400(info.value, needle)
    if case.endswith("(engine)"):  # the engine's message, with the field it names as param
        error = info.value.response.json()["error"]
        assert error["param"] == ("messages" if "context" in case else needle), error
    assert client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=2).choices


@pytest.mark.parametrize("case", sorted(BAD_COMPLETIONS))
def test_completions_bad_input_is_400(client, case):
    kwargs, needle, param = BAD_COMPLETIONS[case]
    request = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**request)
    _check_400(info.value, needle)
    assert info.value.response.json()["error"]["param"] == param


def _check_400(err: openai.BadRequestError, needle: str) -> None:
    assert err.status_code == 400
    error = err.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"] or needle == error["param"], error


def test_response_format_constrains_the_answer(client):
    """json_object and json_schema reach the engine's structured output: whatever the random
    weights pick, a finished answer parses (and validates against the schema); one cut by
    max_tokens is the start of an object."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                               "ok": {"type": "boolean"}}, "required": ["city", "ok"],
              "additionalProperties": False}
    formats = [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}]
    for response_format in formats:
        for seed in range(3):
            resp = client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=64,
                                                  temperature=0.8, seed=seed, response_format=response_format)
            choice = resp.choices[0]
            if choice.finish_reason == "length":
                assert choice.message.content.lstrip().startswith("{"), choice
                continue
            assert choice.finish_reason == "stop", choice
            value = json.loads(choice.message.content)
            assert isinstance(value, dict)
            if response_format["type"] == "json_schema":
                jsonschema.validate(value, schema)
    with pytest.raises(openai.BadRequestError) as info:  # the compiler's message, as a 400
        client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=4,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"schema": {"type": "nonsense"}}})
    assert info.value.status_code == 400


def test_invalid_json_is_400(frontend):
    resp = httpx.post(f"{frontend.base_url}/v1/chat/completions", content=b'{"model": "minisgl", "messages": [',
                      headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert "JSON" in resp.json()["error"]["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=CONVERSATIONS[0], max_tokens=2)
    error = info.value.response.json()["error"]
    assert error["code"] == "model_not_found" and "gpt-4o" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_no_chat_template_is_400(triton, tiny_llama, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in folder.glob("chat_template.*"):
        extra.unlink()
    settings = ServerSettings(triton_url=triton.grpc_url, model=MODEL, tokenizer=str(folder))
    with InProcessFrontend(settings) as fe:
        client = openai.OpenAI(base_url=f"{fe.base_url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=2)
        assert "chat template" in info.value.response.json()["error"]["message"]
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices  # raw prompts still work
        template = tmp_path / "template.jinja"
        template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    settings.chat_template = str(template)
    with InProcessFrontend(settings) as fe:
        client = openai.OpenAI(base_url=f"{fe.base_url}/v1", api_key="unused", max_retries=0)
        got = client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=2)
        assert got.usage.prompt_tokens == len(folder_tokens(folder, CONVERSATIONS[0][0]["content"] + "\n"))


def folder_tokens(folder, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).encode(text)


def test_unreachable_triton_is_503(tiny_llama):
    settings = ServerSettings(triton_url=f"127.0.0.1:{free_port()}", model=MODEL, tokenizer=tiny_llama)
    with InProcessFrontend(settings) as fe:
        assert httpx.get(f"{fe.base_url}/health").status_code == 503
        client = openai.OpenAI(base_url=f"{fe.base_url}/v1", api_key="unused", max_retries=0)
        for call in (lambda: client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=2),
                     lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=2, stream=True)):
            with pytest.raises(openai.InternalServerError) as info:
                call()
            assert info.value.status_code == 503
            assert info.value.response.json()["error"]["code"] == "model_not_ready"


# ---------------------------------------------------------------- load and cancellation


def test_64_concurrent_streams(frontend, offline, chat_prompts):
    refs = [greedy_ref(offline, p)["text"] for p in chat_prompts]

    async def one(aclient, k):
        conv = CONVERSATIONS[k % len(CONVERSATIONS)]
        stream = await aclient.chat.completions.create(model=MODEL, messages=conv, max_tokens=MAX_TOKENS, stream=True,
                                                       stream_options={"include_usage": True},
                                                       extra_body=IGNORE_EOS, **GREEDY)
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        return text, usage

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{frontend.base_url}/v1", api_key="unused", max_retries=0,
                                     timeout=300, http_client=httpx.AsyncClient(limits=httpx.Limits(
                                         max_connections=100)))
        try:
            return await asyncio.gather(*(one(aclient, k) for k in range(64)))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    for k, (text, usage) in enumerate(results):
        assert text == refs[k % len(refs)], f"stream {k}"
        assert usage.completion_tokens == MAX_TOKENS


def _wait_busy(triton: TritonServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = triton.metrics_text()
        if (parse_metric(text, "minisgl_num_requests_running") > 0
                and parse_metric(text, "minisgl_kv_pages", {"state": "locked"}) > 0):
            return
        time.sleep(0.1)
    raise AssertionError("the long request never showed in the gauges")


def _wait_aborted(triton: TritonServer, before: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if triton.metric("minisgl_requests_total", {"finish_reason": "abort"}) > before:
            return
        time.sleep(0.2)
    raise AssertionError("the Triton request was not cancelled")


LONG = {"model": MODEL, "messages": CONVERSATIONS[0], "max_tokens": 3000, "ignore_eos": True}


def test_disconnect_mid_stream_frees_pages(triton, frontend):
    triton.wait_idle()
    aborted = triton.metric("minisgl_requests_total", {"finish_reason": "abort"})
    with httpx.stream("POST", f"{frontend.base_url}/v1/chat/completions", json={**LONG, "stream": True},
                      timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
        _wait_busy(triton)
    # leaving the block closed the connection mid-stream
    _wait_aborted(triton, aborted)
    triton.wait_idle()


def test_disconnect_while_waiting_for_whole_answer_frees_pages(triton, frontend):
    triton.wait_idle()
    aborted = triton.metric("minisgl_requests_total", {"finish_reason": "abort"})
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", frontend.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        _wait_busy(triton)
    _wait_aborted(triton, aborted)
    triton.wait_idle()


def test_model_not_ready_is_503(triton, tiny_llama):
    """A Triton model that is not ready (here: not loaded at all): /health and requests get 503."""
    settings = ServerSettings(triton_url=triton.grpc_url, model="minisgl_not_loaded", tokenizer=tiny_llama)
    with InProcessFrontend(settings) as fe:
        assert httpx.get(f"{fe.base_url}/health").status_code == 503
        client = openai.OpenAI(base_url=f"{fe.base_url}/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(model="minisgl_not_loaded", messages=CONVERSATIONS[0], max_tokens=2,
                                               stream=stream)
            assert info.value.status_code == 503
            assert info.value.response.json()["error"]["code"] == "model_not_ready"


# ---------------------------------------------------------------- behind routers and gateways

# the bodies the SGLang Model Gateway (sglang-router 0.3.2) sends for plain requests (captured)
ROUTER_CHAT_EXTRAS = {"logprobs": False, "no_stop_trim": False, "ignore_eos": False, "continue_final_message": False,
                      "skip_special_tokens": True, "separate_reasoning": True, "stream_reasoning": True,
                      "return_hidden_states": False}
ROUTER_COMPLETION_EXTRAS = {"echo": False, "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True,
                            "return_hidden_states": False}


def test_the_routers_request_bodies_are_served(frontend, offline, chat_prompts):
    ref = offline(chat_prompts[0], max_tokens=MAX_TOKENS, temperature=0.0)
    body = {"messages": CONVERSATIONS[0], "model": MODEL, "max_completion_tokens": MAX_TOKENS, "stream": False,
            "temperature": 0.0, **ROUTER_CHAT_EXTRAS}
    resp = httpx.post(f"{frontend.base_url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == ref["text"]
    comp_ref = offline(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "stream": False, "temperature": 0.0,
            **ROUTER_COMPLETION_EXTRAS}
    resp = httpx.post(f"{frontend.base_url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == comp_ref["text"]


def test_unknown_fields_are_ignored_with_a_log_line(client, frontend, offline, chat_prompts):
    got = client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=MAX_TOKENS,
                                         extra_body={**IGNORE_EOS, "colour_of_the_sky": "blue"}, **GREEDY)
    assert got.choices[0].message.content == greedy_ref(offline, chat_prompts[0])["text"]
    deadline = time.monotonic() + 10
    while "colour_of_the_sky" not in frontend.log_path.read_text():
        assert time.monotonic() < deadline, frontend.log_tail()
        time.sleep(0.1)
    line = next(l for l in frontend.log_path.read_text().splitlines() if "colour_of_the_sky" in l)
    assert "ignored" in line and "/v1/chat/completions" in line


def test_continue_final_message(client, offline, tokenizer):
    conv = [{"role": "user", "content": "Finish my sentence."}, {"role": "assistant", "content": "The sky is"}]
    prompt = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=False,
                                           continue_final_message=True)
    assert prompt.endswith("The sky is")
    got = client.chat.completions.create(model=MODEL, messages=conv, max_tokens=MAX_TOKENS,
                                         extra_body={**IGNORE_EOS, "continue_final_message": True}, **GREEDY)
    assert got.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert got.choices[0].message.content == greedy_ref(offline, prompt)["text"]


def test_continuous_usage_stats_put_usage_on_every_chunk(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CONVERSATIONS[0], max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body=IGNORE_EOS, **GREEDY))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == MAX_TOKENS
    assert len({c.usage.prompt_tokens for c in chunks}) == 1 and chunks[0].usage.prompt_tokens > 0
    assert any(c.choices and c.choices[0].delta.content for c in chunks) and chunks[-1].choices == []


def test_router_probe_endpoints(frontend, tiny_llama):
    for path in ("/server_info", "/get_server_info"):
        info = httpx.get(f"{frontend.base_url}{path}").json()
        assert info["served_model_name"] == MODEL and info["model_path"] == tiny_llama
        assert info["page_size"] == SETTINGS["page_size"] and info["tp_size"] == 1 and info["dp_size"] == 1
        assert info["model_parameters"]["max_total_tokens"] == str(SETTINGS["max_total_tokens"])
    for path in ("/model_info", "/get_model_info"):
        info = httpx.get(f"{frontend.base_url}{path}").json()
        assert info["model_path"] == info["tokenizer_path"] == tiny_llama
        assert info["is_generation"] is True and info["model_type"] == "llama"


def test_get_load_and_metrics_follow_the_models_gauges(triton, frontend):
    triton.wait_idle()
    load = httpx.get(f"{frontend.base_url}/get_load").json()
    assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    with httpx.stream("POST", f"{frontend.base_url}/v1/chat/completions", json={**LONG, "stream": True},
                      timeout=60) as resp:
        lines = resp.iter_lines()
        next(lines)
        _wait_busy(triton)
        load = httpx.get(f"{frontend.base_url}/get_load").json()[0]
        assert load["num_reqs"] >= 1 and load["num_tokens"] >= SETTINGS["page_size"]
        assert load["num_tokens"] % SETTINGS["page_size"] == 0
        text = httpx.get(f"{frontend.base_url}/metrics").text
        assert parse_metric(text, "minisgl_num_requests_running") >= 1  # Triton's own metrics, passed on
        assert parse_metric(text, "vllm:num_requests_running", {"model_name": MODEL}) == parse_metric(
            text, "minisgl_num_requests_running")
        assert parse_metric(text, "vllm:num_requests_waiting", {"model_name": MODEL}) == parse_metric(
            text, "minisgl_num_requests_pending")
        assert parse_metric(text, "vllm:kv_cache_usage_perc", {"model_name": MODEL}) == parse_metric(
            text, "minisgl_kv_cache_usage_ratio") > 0
        assert parse_metric(text, "vllm:cache_config_info", {"block_size": str(SETTINGS["page_size"])}) == 1
    triton.wait_idle()
    resp = httpx.get(f"{frontend.base_url}/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    assert parse_metric(resp.text, "vllm:num_requests_running") == 0


def test_metrics_unreachable_is_503(triton, tiny_llama):
    settings = ServerSettings(triton_url=triton.grpc_url, model=MODEL, tokenizer=tiny_llama,
                              metrics_url=f"http://127.0.0.1:{free_port()}/metrics")
    with InProcessFrontend(settings) as fe:
        for path in ("/metrics", "/get_load"):
            resp = httpx.get(f"{fe.base_url}{path}")
            assert resp.status_code == 503 and "metrics" in resp.json()["error"]["message"], path


def test_api_key(triton, tiny_llama):
    settings = ServerSettings(triton_url=triton.grpc_url, model=MODEL, tokenizer=tiny_llama, api_key="sk-test",
                              metrics_url=triton.metrics_url)
    with InProcessFrontend(settings) as fe:
        for key in ("wrong", None):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
                resp = httpx.request(method, f"{fe.base_url}{path}", headers=headers,
                                     json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
                assert resp.status_code == 401, (path, key)
                assert resp.json()["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=f"{fe.base_url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{fe.base_url}/v1", api_key="sk-test", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
        for path in ("/health", "/metrics", "/get_load", "/server_info", "/model_info"):
            assert httpx.get(f"{fe.base_url}{path}").status_code == 200, path


def test_vllm_guided_keys_constrain_the_answer(client):
    for seed in range(3):
        got = client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=8, temperature=0.9,
                                             seed=seed, extra_body={"guided_choice": ["yes", "no"]})
        assert got.choices[0].message.content in ("yes", "no"), got
