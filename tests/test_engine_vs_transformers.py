"""Greedy outputs of the engine equal `transformers` token for token (CPU, fp32)."""

from __future__ import annotations

import pytest

from minisgl_backend import LLM, SamplingParams
from tests.hf_reference import hf_greedy

PROMPTS = [
    "Hello",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a small dragon who loved to read books.",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "café naïve 日本語",
]

MODELS = [
    ("llama", dict(num_kv_heads=2)),
    ("llama", dict(num_kv_heads=1, tie_word_embeddings=True)),
    ("qwen2", dict(num_kv_heads=2)),
    ("qwen2", dict(num_kv_heads=1, tie_word_embeddings=True)),
    ("qwen3", dict(num_kv_heads=2)),
    ("qwen3", dict(num_kv_heads=1, tie_word_embeddings=True)),
    ("llama", dict(num_kv_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
]


@pytest.mark.parametrize("arch,kwargs", MODELS, ids=lambda v: v if isinstance(v, str) else repr(sorted(v)))
def test_greedy_batch_equals_transformers(tiny_model_factory, arch, kwargs):
    path = tiny_model_factory(arch, **kwargs)
    llm = LLM(path, device="cpu", dtype="float32", page_size=4, max_total_tokens=2048)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(PROMPTS, outs):
        ref = hf_greedy(path, prompt, 24)
        assert out["token_ids"] == ref, prompt
        assert out["finish_reason"] == ("stop" if len(ref) < 24 else "length")
        assert out["text"] == llm.tokenizer.decode(out["token_ids"], skip_special_tokens=True)
    assert llm.scheduler.leaks() == []


def test_cached_prefix_prefill_equals_transformers(tiny_llama):
    llm = LLM(tiny_llama, device="cpu", dtype="float32", page_size=4, max_total_tokens=2048)
    base = "Once upon a time, in a land far away, there lived a small dragon"
    first = llm.generate(base + " who loved books.", SamplingParams(max_tokens=16, temperature=0))[0]
    assert first["cached_tokens"] == 0
    prompts = [base + " who hated rain.", base + " who loved books."]
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    for prompt, out in zip(prompts, outs):
        assert out["cached_tokens"] >= 16, "the shared prefix should come from the radix cache"
        assert out["token_ids"] == hf_greedy(tiny_llama, prompt, 16)


def test_token_id_prompts_and_chunked_prefill(tiny_llama):
    llm = LLM(tiny_llama, device="cpu", dtype="float32", page_size=4, chunk_size=7, prefill_budget=9)
    ids = list(range(5, 60))
    out = llm.generate([ids], SamplingParams(max_tokens=12, temperature=0))[0]
    assert out["token_ids"] == hf_greedy(tiny_llama, ids, 12)
    assert out["num_input_tokens"] == len(ids)
