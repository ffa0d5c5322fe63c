"""Sampling and stopping through the whole engine (LLM.generate)."""

from __future__ import annotations

from minisgl_backend import LLM, SamplingParams

CPU = dict(device="cpu", dtype="float32", page_size=4, max_total_tokens=2048)
PROMPTS = ["Hello there", "The weather today is", "1 2 3"]


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llama):
    llm = LLM(tiny_llama, **CPU)
    seeded = [SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 3)]
    first = llm.generate(PROMPTS, seeded)
    again = llm.generate(PROMPTS, seeded)
    alone = [llm.generate([p], sp)[0] for p, sp in zip(PROMPTS, seeded)]
    assert [o["token_ids"] for o in first] == [o["token_ids"] for o in again] == [o["token_ids"] for o in alone]
    other_seed = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99))
    assert other_seed[0]["token_ids"] != first[0]["token_ids"]


def test_top_k_one_equals_greedy(tiny_llama):
    llm = LLM(tiny_llama, **CPU)
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0))
    top1 = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=7))
    assert [o["token_ids"] for o in top1] == [o["token_ids"] for o in greedy]


def test_stop_token_ids_and_stop_strings(tiny_llama):
    llm = LLM(tiny_llama, **CPU)
    greedy = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    ids, text = greedy["token_ids"], greedy["text"]
    stop_id = ids[5]
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                  stop_token_ids=[stop_id]))[0]
    assert out["finish_reason"] == "stop" and out["token_ids"] == ids[:ids.index(stop_id) + 1]

    stop_text = text[len(text) // 2:len(text) // 2 + 3]
    assert stop_text.strip(), "the tiny model's greedy text should have something to stop on"
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                  stop=[stop_text]))[0]
    assert out["finish_reason"] == "stop"
    assert out["text"] == text[:text.index(stop_text)]
    assert llm.scheduler.leaks() == []


def test_min_tokens_suppresses_stop_ids(tiny_llama):
    llm = LLM(tiny_llama, **CPU)
    ids = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]["token_ids"]
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                  stop_token_ids=[ids[0]], min_tokens=4))[0]
    assert len(out["token_ids"]) >= 4 and ids[0] not in out["token_ids"][:3]


def test_logprobs_are_returned_per_token(tiny_llama):
    llm = LLM(tiny_llama, **CPU)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0, logprobs=True))[0]
    assert len(out["logprobs"]) == len(out["token_ids"]) and all(lp <= 0 for lp in out["logprobs"])
