"""Online scheduling: mixed prefill + decode steps, the decode starvation bound with mixed steps
off, longest-prefix-match ordering with aging; outputs stay those of each request run alone."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisgl_backend import LLM, SamplingParams
from minisgl_backend.batch import Req
from minisgl_backend.config import ConfigError, EngineConfig
from minisgl_backend.messages import TokenBatch
from minisgl_backend.scheduler.cache import CacheManager
from minisgl_backend.scheduler.policy import SchedulePolicy, cached_prefix_len
from minisgl_backend.scheduler.radix import RadixTree

CPU = dict(device="cpu", dtype="float32", page_size=4, max_total_tokens=4096, enable_overlap=False)
GREEDY = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731


@dataclass
class Step:
    is_decode: bool
    items: list[tuple[int, int, int, bool]]  # (rid, start, end, samples)

    def decode_rids(self) -> set[int]:
        return {rid for rid, s, e, samples in self.items if _is_decode_item(s, e, samples)}

    def prefill_tokens(self, rids: set[int]) -> int:
        return sum(e - s for rid, s, e, samples in self.items if rid in rids and not _is_decode_item(s, e, samples))


def _is_decode_item(start: int, end: int, samples: bool) -> bool:
    return end - start == 1 and samples and start > 0


def record_steps(llm: LLM) -> list[Step]:
    steps: list[Step] = []
    forward = llm.scheduler.engine.forward

    def recording(batch):
        steps.append(Step(batch.is_decode, [(it.req.rid, it.start, it.end, it.samples) for it in batch.items]))
        return forward(batch)

    llm.scheduler.engine.forward = recording
    return steps


def serve_with_arrivals(llm: LLM, first: list[list[int]], first_params: SamplingParams,
                        later: list[list[int]], later_params: SamplingParams, after_tokens: int):
    """Submit `first`; once they produced `after_tokens` tokens, submit `later`; run until idle.
    Returns {rid: token ids} and the rids of `first` and `later`."""
    outputs: dict[int, list[int]] = {}
    collect = lambda out: outputs.setdefault(out.rid, []).extend(out.token_ids)  # noqa: E731
    first_rids = [llm.router.submit(p, first_params, collect) for p in first]
    later_rids: list[int] = []
    deliver, seen = llm.io.listener, [0]

    def inject(events):
        deliver(events)
        seen[0] += sum(len(e.tokens) for e in events if isinstance(e, TokenBatch))
        if seen[0] >= after_tokens and not later_rids:
            later_rids.extend(llm.router.submit(p, later_params, collect) for p in later)

    llm.io.listener = inject
    llm.scheduler.run_until_idle()
    llm.io.listener = deliver
    return outputs, first_rids, later_rids


def alone(model: str, prompt: list[int], params: SamplingParams) -> list[int]:
    llm = LLM(model, **CPU, enable_prefix_cache=False)
    return llm.generate([prompt], params)[0]["token_ids"]


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (n, length), generator=g).tolist()


def test_mixed_steps_carry_every_decode_plus_prefill_within_the_budget(tiny_llama):
    budget = 24
    llm = LLM(tiny_llama, **CPU, step_token_budget=budget, chunk_size=64)
    steps = record_steps(llm)
    streams, long = prompts(3, 8, seed=1), prompts(2, 100, seed=2)
    outputs, stream_rids, long_rids = serve_with_arrivals(llm, streams, GREEDY(40), long, GREEDY(4), after_tokens=6)
    assert llm.scheduler.leaks() == []
    prefilling = [s for s in steps if s.prefill_tokens(set(long_rids))]
    assert len(prefilling) >= 2 * 100 // budget, "each long prompt is spread over several steps"
    for step in prefilling:
        assert not step.is_decode, "a step with prefill chunks is not a decode batch (no CUDA graph)"
        decoding = step.decode_rids() & set(stream_rids)
        assert len(decoding) == 3, "every running stream gets its token in every mixed step"
        assert 0 < step.prefill_tokens(set(long_rids)) <= budget - len(step.decode_rids())
    assert all(s.is_decode for s in steps if len(s.decode_rids()) == len(s.items)), "pure decode steps stay decode"
    for rid, prompt in zip(stream_rids + long_rids, streams + long):
        params = GREEDY(40) if rid in stream_rids else GREEDY(4)
        assert outputs[rid] == alone(tiny_llama, prompt, params), f"request {rid} changed in a mixed batch"


def longest_prefill_run(steps: list[Step], stream_rids: set[int]) -> int:
    """Most steps in a row that gave none of the streams a token while one of them was running."""
    worst = run = 0
    started = False
    for step in steps:
        got = step.decode_rids() & stream_rids
        started = started or bool(got)
        run = 0 if got else run + 1
        if started:
            worst = max(worst, run)
    return worst


@pytest.mark.parametrize("bound", [2, 1000])
def test_prefill_first_still_decodes_every_n_steps(tiny_llama, bound):
    llm = LLM(tiny_llama, **CPU, enable_mixed_batches=False, max_prefill_steps_in_a_row=bound,
              prefill_budget=16, chunk_size=16)
    steps = record_steps(llm)
    streams, long = prompts(2, 8, seed=3), prompts(3, 96, seed=4)
    outputs, stream_rids, long_rids = serve_with_arrivals(llm, streams, GREEDY(30), long, GREEDY(2), after_tokens=4)
    run = longest_prefill_run(steps, set(stream_rids))
    if bound == 2:
        assert run <= 2, f"decode waited {run} prefill steps (max_prefill_steps_in_a_row=2)"
    else:
        assert run >= 3 * 96 // 16 - 1, "without the bound a long prefill queue stalls decode throughout"
    assert all(len(outputs[rid]) == 30 for rid in stream_rids)
    assert llm.scheduler.leaks() == []


def admission_order(steps: list[Step]) -> list[int]:
    order: list[int] = []
    for step in steps:
        for rid, start, end, _ in step.items:
            if end - start > 1 and rid not in order:
                order.append(rid)
    return order


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_lpm_admits_cached_prefixes_first(tiny_llama, policy):
    llm = LLM(tiny_llama, **CPU, schedule_policy=policy, max_running_requests=2)
    shared = prompts(1, 40, seed=5)[0]
    llm.generate([shared], GREEDY(1))  # warm the cache with the shared prefix
    steps = record_steps(llm)
    cold = prompts(4, 44, seed=6)
    warm = [shared + tail for tail in prompts(4, 4, seed=7)]
    mixed_queue = [cold[0], warm[0], cold[1], warm[1], cold[2], warm[2], cold[3], warm[3]]
    outs = llm.generate(mixed_queue, GREEDY(3))
    order = admission_order(steps)
    first_rid = min(order)
    warm_rids = {first_rid + i for i in (1, 3, 5, 7)}
    if policy == "lpm":
        assert set(order[:4]) == warm_rids, f"lpm serves cached prefixes first, got {order}"
    else:
        assert order == sorted(order), "fcfs keeps arrival order"
    assert [o["token_ids"] for o in outs] == [alone(tiny_llama, p, GREEDY(3)) for p in mixed_queue]
    assert llm.scheduler.leaks() == []


def make_policy(max_wait_steps: int) -> tuple[SchedulePolicy, list[Req]]:
    cache = CacheManager(64, 2, torch.zeros(4, 64, dtype=torch.int32))
    cache.tree.insert([1, 2, 3, 4], [0, 1])
    policy = SchedulePolicy("lpm", cache, max_wait_steps=max_wait_steps)
    reqs = [Req(0, [9, 9, 9, 9, 9], GREEDY(1), 0, 1)] + [Req(i, [1, 2, 3, 4, i], GREEDY(1), 0, 1) for i in (1, 2, 3)]
    for req in reqs:
        policy.enqueued(req)
    return policy, reqs


def test_aging_puts_a_long_waiting_request_first():
    policy, reqs = make_policy(max_wait_steps=5)
    assert [r.rid for r in policy.order(reqs)] == [1, 2, 3, 0], "longest cached prefix first"
    for _ in range(5):
        policy.tick()
    late = Req(4, [1, 2, 3, 4, 4], GREEDY(1), 0, 1)
    policy.enqueued(late)
    assert [r.rid for r in policy.order(reqs + [late])] == [0, 1, 2, 3, 4], "aged requests go first, FCFS"
    policy.dequeued(reqs[0])
    assert policy.waited(reqs[0]) == 0


def test_lpm_with_aging_never_passes_a_request_over_forever(tiny_llama):
    """A cold request among a steady stream of warm ones: pure lpm leaves it to the very end;
    the aging bound admits it after about `max_wait_steps` steps."""
    def cold_admission_index(max_wait_steps: int) -> int:
        llm = LLM(tiny_llama, **CPU, schedule_policy="lpm", max_running_requests=1,
                  max_wait_steps=max_wait_steps)
        shared = prompts(1, 40, seed=8)[0]
        llm.generate([shared], GREEDY(1))
        steps = record_steps(llm)
        queue = [prompts(1, 44, seed=9)[0]] + [shared + t for t in prompts(12, 4, seed=10)]
        llm.generate(queue, GREEDY(2))
        order = admission_order(steps)
        return order.index(min(order))

    assert cold_admission_index(10_000) == 12
    assert cold_admission_index(4) <= 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=12), min_size=1, max_size=8),
       st.lists(st.integers(0, 2), min_size=1, max_size=14))
def test_cached_prefix_len_equals_match_without_touching_the_tree(inserted, query):
    tree = RadixTree(2)
    page = 0
    for seq in inserted:
        aligned = seq[:len(seq) // 2 * 2]
        have = tree.match_prefix(aligned).pages
        new = list(range(page, page + len(aligned) // 2 - len(have)))
        page += len(new)
        tree.insert(aligned, have + new)
    shape = lambda: sorted((len(n.key), n.last_access) for n in _nodes(tree))  # noqa: E731
    before = shape()
    n = cached_prefix_len(tree, query)
    assert shape() == before, "cached_prefix_len must not split nodes or touch the LRU clock"
    assert n == tree.match_prefix(query[:-1]).num_tokens


def _nodes(tree: RadixTree):
    stack = [tree.root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())


@pytest.mark.parametrize("settings_,message", [
    ({"schedule_policy": "random"}, "schedule_policy must be one of"),
    ({"step_token_budget": 0}, "step_token_budget must be >= 1"),
    ({"max_prefill_steps_in_a_row": 0}, "max_prefill_steps_in_a_row must be >= 1"),
    ({"max_wait_steps": "soon"}, "'max_wait_steps' expects int"),
])
def test_bad_scheduling_settings_name_the_field(tiny_llama, settings_, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_flat({"model_path": tiny_llama, **settings_})
