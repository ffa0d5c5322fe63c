"""Multi-LoRA in the engine: requests of different adapters and of the base model in one batch
give what each gives alone and what PEFT's merged model gives; the prefix cache never crosses
adapters; residency waits, evicts and drops; nothing leaks."""

from __future__ import annotations

import os
import random

import pytest
import torch

from minisgl_backend import LLM, SamplingParams
from minisgl_backend.lora.adapter import AdapterError
from tests.test_lora_units import make_peft_adapter

CPU = dict(device="cpu", dtype="float32", max_total_tokens=4096, page_size=4, enable_lora=True, max_lora_rank=8)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": make_peft_adapter(tiny_llama, root / "a", ["q_proj", "v_proj"], rank=4, alpha=16, seed=1),
            "b": make_peft_adapter(tiny_llama, root / "b", ALL, rank=8, alpha=8, seed=2, rslora=True),
            "c": make_peft_adapter(tiny_llama, root / "c", ["gate_proj", "down_proj", "o_proj"], rank=2, seed=3)}


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(5, 30))] for _ in range(5)]


def _peft_greedy(base: str, adapter: str | None, prompt: list[int], max_new_tokens: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


MIX = [None, "a", "b", "a", None]


def _params(name: str | None, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0, lora_name=name, **kw)


@pytest.fixture(scope="module")
def mixed(tiny_llama, adapters, prompts):
    llm = LLM(tiny_llama, lora_modules=adapters, **CPU, enable_overlap=False)
    outs = llm.generate(prompts, [_params(n) for n in MIX])
    assert llm.scheduler.leaks() == []
    llm.shutdown()
    return [o["token_ids"] for o in outs]


def test_a_mixed_batch_equals_peft_merged_models(tiny_llama, adapters, prompts, mixed):
    expected = [_peft_greedy(tiny_llama, adapters.get(n), p, 8) for n, p in zip(MIX, prompts)]
    assert mixed == expected
    assert mixed[1] != _peft_greedy(tiny_llama, None, prompts[1], 8), "the adapter changes the output"


@pytest.mark.parametrize("variant", ["solo", "overlap", "one_slot"])
def test_batch_mates_and_scheduling_never_change_an_output(tiny_llama, adapters, prompts, mixed, variant):
    settings = dict(CPU, enable_overlap=variant == "overlap", max_loras=1 if variant == "one_slot" else 4)
    llm = LLM(tiny_llama, lora_modules=adapters, **settings)
    if variant == "solo":
        outs = [llm.generate([p], [_params(n)])[0] for n, p in zip(MIX, prompts)]
    else:
        outs = llm.generate(prompts, [_params(n) for n in MIX])
    assert [o["token_ids"] for o in outs] == mixed
    if variant == "one_slot":  # a and b shared one slot: the later adapter waited, then evicted the other
        assert llm.scheduler.adapters.evictions >= 1
    assert llm.scheduler.leaks() == []
    llm.shutdown()


def test_the_prefix_cache_never_crosses_adapters(tiny_llama, adapters, prompts):
    llm = LLM(tiny_llama, lora_modules=adapters, **CPU, enable_overlap=False)
    prompt = prompts[0] * 3
    first = llm.generate([prompt], [_params("a")])[0]
    same = llm.generate([prompt], [_params("a")])[0]
    other = llm.generate([prompt], [_params("b")])[0]
    base = llm.generate([prompt], [_params(None)])[0]
    assert first["cached_tokens"] == 0 and same["cached_tokens"] > 0
    assert other["cached_tokens"] == 0 and base["cached_tokens"] == 0
    assert same["token_ids"] == first["token_ids"] != other["token_ids"]
    assert llm.scheduler.leaks() == []
    llm.shutdown()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_other_architectures_equal_peft_merged_models(tiny_model_factory, tmp_path, prompts, arch):
    base = tiny_model_factory(arch, num_kv_heads=2)
    path = make_peft_adapter(base, tmp_path / arch, ALL, rank=4, alpha=16, seed=4)
    llm = LLM(base, lora_modules={"x": path}, **CPU)
    outs = llm.generate(prompts[:3], [_params(n) for n in (None, "x", None)])
    llm.shutdown()
    assert [o["token_ids"] for o in outs] == [_peft_greedy(base, path if i == 1 else None, p, 8)
                                              for i, p in enumerate(prompts[:3])]


def test_adapters_written_without_peft_are_what_peft_reads(tiny_llama, prompts, tmp_path):
    from minisgl_backend.testing.lora import write_random_adapter

    path = write_random_adapter(tiny_llama, tmp_path / "w", ["k_proj", "o_proj", "up_proj"], rank=4, seed=5, scale=0.2)
    llm = LLM(tiny_llama, lora_modules={"w": path}, **CPU)
    out = llm.generate([prompts[2]], [_params("w")])[0]["token_ids"]
    llm.shutdown()
    assert out == _peft_greedy(tiny_llama, path, prompts[2], 8) != _peft_greedy(tiny_llama, None, prompts[2], 8)


def test_requests_wait_for_a_slot_and_adapters_load_lru(tiny_llama, adapters, prompts):
    llm = LLM(tiny_llama, lora_modules=adapters, **dict(CPU, max_loras=1), enable_overlap=False)
    names = ["a", "b", "c", "a", None, "c", "b"]
    outs = llm.generate(prompts + prompts[:2], [_params(n) for n in names])
    assert all(o["finish_reason"] == "length" for o in outs)
    solo = {n: llm.generate([prompts[0]], [_params(n)])[0]["token_ids"] for n in ("a", "c")}
    assert outs[0]["token_ids"] == solo["a"] and outs[5]["token_ids"] == solo["c"]
    assert outs[1]["token_ids"] == outs[6]["token_ids"]  # b, before and after waiting for a slot
    adapters_state = llm.scheduler.adapters
    assert len(adapters_state.resident()) == 1 and adapters_state.evictions >= 3
    reads = llm.scheduler.engine.lora.folder_reads
    assert 3 <= reads < adapters_state.loads, "an adapter evicted last comes back without reading its folder"
    assert llm.scheduler.leaks() == []
    llm.shutdown()


def test_adapters_load_and_unload_at_run_time(tiny_llama, adapters, prompts, tmp_path):
    root = os.path.dirname(adapters["a"])
    llm = LLM(tiny_llama, **CPU, lora_root=root, enable_overlap=False)
    with pytest.raises(ValueError, match=r"LoRA late is not supported, we currently support \[\]"):
        llm.generate([prompts[0]], [_params("late")])
    llm.load_lora("late", adapters["a"])
    before = llm.generate([prompts[0] * 3], [_params("late")])[0]
    again = llm.generate([prompts[0] * 3], [_params("late")])[0]
    assert again["cached_tokens"] > 0
    cached = llm.scheduler.cache.stats().cached_pages
    llm.unload_lora("late")
    llm.scheduler.run_until_idle()
    assert llm.scheduler.cache.stats().cached_pages < cached, "its cached prefixes went with it"
    assert "late" not in llm.scheduler.adapters.resident().values()
    with pytest.raises(ValueError, match="LoRA late is not supported"):
        llm.generate([prompts[0]], [_params("late")])
    with pytest.raises(AdapterError, match="outside lora_root"):  # what the servers' load endpoints call
        llm.router.lora.add("elsewhere", str(tmp_path), run_time=True)
    llm.load_lora("late", adapters["a"])
    assert llm.generate([prompts[0] * 3], [_params("late")])[0]["token_ids"] == before["token_ids"]
    assert llm.scheduler.leaks() == []
    llm.shutdown()


def test_errors_name_the_problem(tiny_llama, adapters, prompts):
    off = LLM(tiny_llama, device="cpu", dtype="float32", max_total_tokens=1024)
    with pytest.raises(ValueError, match="LoRA feature is not enabled."):
        off.generate([prompts[0]], [_params("a")])
    off.shutdown()
    with pytest.raises(AdapterError, match="max_lora_rank is 4"):
        LLM(tiny_llama, lora_modules={"b": adapters["b"]}, **dict(CPU, max_lora_rank=4))
    with pytest.raises(AdapterError, match="enable_lora is off"):
        LLM(tiny_llama, lora_modules={"b": adapters["b"]}, device="cpu", dtype="float32")


def test_tp2_with_adapters_equals_tp1(tiny_llama, adapters, prompts, mixed):
    llm = LLM(tiny_llama, lora_modules=adapters, **CPU, tp_size=2)
    try:
        outs = llm.generate(prompts, [_params(n) for n in MIX])
    finally:
        llm.shutdown()
    assert [o["token_ids"] for o in outs] == mixed
