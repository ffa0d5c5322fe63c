"""The scheduler under load: retraction, eviction, chunking, overlap, abort; nothing leaks."""

from __future__ import annotations

import pytest

from minisgl_backend import LLM, SamplingParams
from minisgl_backend.messages import AbortMsg, TokenBatch, TokenEvent, UserMsg
from tests.workloads import shared_prefix_workload

CPU = dict(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    return tiny_model_factory("llama", num_kv_heads=2)


@pytest.fixture(scope="module")
def workload_300(model):
    return shared_prefix_workload(300, vocab=500, max_prompt=300, max_output=64, seed=0)


@pytest.fixture(scope="module")
def alone_outputs(model, workload_300):
    """Each request run on its own, with a cold cache and a roomy pool."""
    llm = LLM(model, **CPU, page_size=4, max_total_tokens=8192, enable_prefix_cache=False)
    return [llm.generate([p], sp)[0]["token_ids"] for p, sp in zip(workload_300.prompts, workload_300.params)]


def _token_ids(outs):
    return [o["token_ids"] for o in outs]


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "prefill_first"])
def test_300_requests_tiny_pool_match_alone_and_leak_nothing(model, workload_300, alone_outputs, mixed):
    llm = LLM(model, **CPU, page_size=4, max_total_tokens=1600, max_running_requests=64,
              prefill_budget=512, chunk_size=128, enable_mixed_batches=mixed)
    outs = llm.generate(workload_300.prompts, workload_300.params)
    assert all(o["finish_reason"] in ("stop", "length") for o in outs)
    assert _token_ids(outs) == alone_outputs
    sched = llm.scheduler
    assert sched.num_retracted > 0, "the pool should be small enough to force retraction"
    assert sched.cache.evicted_pages > 0, "the pool should be small enough to force eviction"
    assert sched.cache.hit_tokens > 0
    assert sched.leaks() == []
    assert sched.cache.flush() > 0
    stats = sched.stats()
    assert stats.free_pages == stats.total_pages and stats.free_rows == stats.total_rows


@pytest.mark.parametrize("variant", [
    dict(enable_overlap=False),
    dict(enable_overlap=True),
    dict(chunk_size=16, prefill_budget=48),
    dict(enable_prefix_cache=False),
    dict(page_size=1),
    dict(page_size=16, max_total_tokens=4096),
    dict(enable_mixed_batches=False, enable_overlap=False),
    dict(enable_mixed_batches=False, enable_overlap=True, max_prefill_steps_in_a_row=1),
    dict(enable_mixed_batches=True, step_token_budget=40, chunk_size=16, enable_overlap=True),
    dict(schedule_policy="lpm", max_wait_steps=8),
])
def test_variants_equal_alone(model, workload_300, alone_outputs, variant):
    n = 60
    settings = dict(page_size=4, max_total_tokens=2400, max_running_requests=32, **CPU)
    settings.update(variant)
    llm = LLM(model, **settings)
    outs = llm.generate(workload_300.prompts[:n], workload_300.params[:n])
    assert _token_ids(outs) == alone_outputs[:n]
    assert llm.scheduler.leaks() == []


def test_prefix_cache_hit_equals_cold(model, workload_300, alone_outputs):
    llm = LLM(model, **CPU, page_size=4, max_total_tokens=8192)
    prompts, params = workload_300.prompts[:40], workload_300.params[:40]
    first = llm.generate(prompts, params)
    hits_before = llm.scheduler.cache.hit_tokens
    second = llm.generate(prompts, params)
    assert llm.scheduler.cache.hit_tokens - hits_before > sum(map(len, prompts)) // 2
    assert _token_ids(first) == _token_ids(second) == alone_outputs[:40]


def test_abort_half_mid_flight(model, workload_300, alone_outputs):
    n = 80
    llm = LLM(model, **CPU, page_size=4, max_total_tokens=2000, max_running_requests=32)
    params = [SamplingParams(**{**{f: getattr(p, f) for f in p.__struct_fields__}, "ignore_eos": False})
              for p in workload_300.params[:n]]
    deliver = llm.io.listener
    seen: dict[int, int] = {}

    def abort_even_after_two_tokens(events):
        deliver(events)
        for ev in events:
            for rid in ev.rids if isinstance(ev, TokenBatch) else []:
                if rid % 2 == 0:
                    seen[rid] = seen.get(rid, 0) + 1
                    if seen[rid] == 2:
                        llm.io.put(AbortMsg(rid))

    llm.io.listener = abort_even_after_two_tokens
    outs = llm.generate(workload_300.prompts[:n], params)
    rid_of = lambda i: i + 1  # noqa: E731  rids are handed out from 1 in prompt order
    aborted = [i for i in range(n) if rid_of(i) % 2 == 0 and outs[i]["finish_reason"] == "abort"]
    assert len(aborted) > n // 4, "most even requests run long enough to be aborted"
    for i, out in enumerate(outs):
        if i in aborted:
            assert out["token_ids"] == alone_outputs[i][:len(out["token_ids"])]
        else:  # odd ones, and even ones that finished before their abort arrived
            assert out["token_ids"] == alone_outputs[i]
    assert llm.scheduler.leaks() == []


def test_invalid_requests_get_errors_not_silence(model):
    llm = LLM(model, **CPU, page_size=4, max_total_tokens=256, max_model_len=128)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="context holds at most"):
        llm.generate([[5] * 200], SamplingParams(max_tokens=4))
    out = llm.generate([[5] * 120], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 8, "max_tokens clamps to the context"
    llm.io.put(UserMsg(999, [10**6], SamplingParams()))
    errors = []
    llm.io.listener = lambda evs: errors.extend(e for e in evs if isinstance(e, TokenEvent))
    llm.scheduler.run_until_idle()
    assert errors and errors[0].finish_reason == "error" and "vocabulary" in errors[0].error
    assert llm.scheduler.leaks() == []


def test_pending_queue_limit_rejects_with_an_error(model):
    llm = LLM(model, **CPU, page_size=4, max_total_tokens=256, max_pending_requests=3)
    outs = llm.generate([[7, 8, 9]] * 5, SamplingParams(max_tokens=2, temperature=0))
    rejected = [o for o in outs if o["finish_reason"] == "error"]
    assert len(rejected) == 2 and "overloaded" in rejected[0]["error"]
    assert all(o["finish_reason"] in ("stop", "length") for o in outs[:3])
    assert llm.scheduler.leaks() == []


@pytest.mark.parametrize("overlap", [False, True])
def test_a_computed_prompt_is_shared_before_its_request_ends(model, overlap):
    """Three requests of one 40-token prompt, admitted a step apart (the prefill budget holds one
    prompt): once the first's prompt is computed, the later ones reuse its pages while it still
    decodes, and everyone's tokens equal a solo run."""
    prompt = list(range(3, 43))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    solo = LLM(model, **CPU, page_size=4, enable_prefix_cache=False).generate([prompt], params)[0]["token_ids"]
    llm = LLM(model, **CPU, page_size=4, max_total_tokens=2048, prefill_budget=40, enable_overlap=overlap)
    outs = llm.generate([prompt] * 3, params)
    assert _token_ids(outs) == [solo] * 3
    assert outs[0]["cached_tokens"] == 0
    assert all(o["cached_tokens"] == 36 for o in outs[2 if overlap else 1:]), [o["cached_tokens"] for o in outs]
    assert llm.scheduler.leaks() == []
    stats = llm.scheduler.stats()
    assert stats.free_pages + stats.cached_pages == stats.total_pages and stats.locked_pages == 0
