"""Per-request fault isolation in the scheduler (in process, with the offline LLM).

The fault-injection hook (FaultConfig.inject_sampling_fault_seed) makes every forward that samples
for the request with that seed raise after the model ran, as a bad sampling input would.
"""

from __future__ import annotations

import random

import pytest

from minisgl_backend import LLM, SamplingParams
from minisgl_backend.messages import ErrorKind, TokenEvent

CPU = dict(device="cpu", dtype="float32", page_size=4, max_total_tokens=2048)
FAULT_SEED = 4242
N = 8


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(1, 500) for _ in range(rng.randrange(3, 40))] for _ in range(N)]


def greedy(seed: int, max_tokens: int = 16) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, seed=seed)


@pytest.fixture(scope="module")
def solo(tiny_llama, prompts):
    llm = LLM(tiny_llama, **CPU, enable_prefix_cache=False)
    try:
        return [llm.generate([p], greedy(100 + i))[0]["token_ids"] for i, p in enumerate(prompts)]
    finally:
        llm.shutdown()


def _events_of(llm: LLM) -> list[TokenEvent]:
    seen: list[TokenEvent] = []
    deliver = llm.io.listener

    def record(events):
        seen.extend(e for e in events if isinstance(e, TokenEvent))
        deliver(events)

    llm.io.listener = record
    return seen


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "normal"])
@pytest.mark.parametrize("fault_step", [0, 5], ids=["at-prefill", "mid-decode"])
def test_one_faulty_request_fails_alone(tiny_llama, prompts, solo, overlap, fault_step):
    llm = LLM(tiny_llama, **CPU, enable_overlap=overlap, inject_sampling_fault_seed=FAULT_SEED,
              inject_sampling_fault_step=fault_step)
    try:
        events = _events_of(llm)
        bad = 3
        params = [greedy(FAULT_SEED if i == bad else 100 + i) for i in range(N)]
        outs = llm.generate(prompts, params)
        for i, out in enumerate(outs):
            if i == bad:
                assert out["finish_reason"] == "error"
                assert "injected sampling fault" in out["error"]
                # overlap: the step before the fault may be in flight, its token is dropped with the request
                expected = {fault_step, max(fault_step - 1, 0)} if overlap else {fault_step}
                assert len(out["token_ids"]) in expected
                assert out["token_ids"] == solo[i][:len(out["token_ids"])]
            else:
                assert out["finish_reason"] == "length" and out["error"] is None
                assert out["token_ids"] == solo[i], f"request {i} changed by its faulty batch-mate"
        finals = [e for e in events if e.finish_reason is not None]
        assert len(finals) == N, "exactly one final event per request"
        kinds = {e.rid: e.error_kind for e in finals}
        assert sorted(kinds.values(), key=str).count(ErrorKind.REQUEST) == 1
        assert llm.scheduler.leaks() == []
        # still serving, and the faulty request's K/V did not poison the prefix cache
        again = llm.generate(prompts, [greedy(100 + i) for i in range(N)])
        assert [o["token_ids"] for o in again] == solo
        assert llm.scheduler.leaks() == []
    finally:
        llm.shutdown()


def test_single_request_batch_fails_only_that_request(tiny_llama, prompts, solo):
    llm = LLM(tiny_llama, **CPU, inject_sampling_fault_seed=FAULT_SEED)
    try:
        out = llm.generate([prompts[0]], greedy(FAULT_SEED))[0]
        assert out["finish_reason"] == "error" and "injected sampling fault" in out["error"]
        assert llm.generate([prompts[1]], greedy(101))[0]["token_ids"] == solo[1]
        assert llm.scheduler.leaks() == []
    finally:
        llm.shutdown()


def test_every_request_failing_alone_is_an_engine_failure(tiny_llama, prompts):
    llm = LLM(tiny_llama, **CPU, inject_sampling_fault_seed=FAULT_SEED)
    try:
        with pytest.raises(RuntimeError, match="injected sampling fault"):
            llm.generate(prompts[:3], greedy(FAULT_SEED))
    finally:
        llm.shutdown()


def test_device_failures_are_not_isolated():
    from minisgl_backend.scheduler.faults import is_device_failure

    assert is_device_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_device_failure(MemoryError())
    assert is_device_failure(RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert not is_device_failure(ValueError("top_k must be positive"))
