"""Speculative decoding (n-gram drafts verified in one step): outputs equal the plain engine's
token for token, for every sampling feature, in every scheduling mode; nothing leaks."""

from __future__ import annotations

import random

import pytest
import torch

from minisgl_backend import LLM, SamplingParams
from minisgl_backend.batch import Req
from minisgl_backend.engine.sampling import Sampler, SamplingTensors
from minisgl_backend.engine.speculative import accepted_length, kept_ids
from minisgl_backend.messages import AbortMsg, StatsEvent, TokenBatch
from minisgl_backend.scheduler.ngram import NgramIndex
from minisgl_backend.scheduler.spec_cost import Payoff, StepCost

CPU = dict(device="cpu", dtype="float32", max_total_tokens=4096)
SPEC = dict(speculative_algorithm="ngram", ngram_min=1, ngram_max=3, speculative_num_tokens=4,
            speculative_max_batch_size=64)


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    """A random model whose greedy outputs fall into loops (small weights: the next id depends
    mostly on the last one), so n-gram drafts are often right."""
    return tiny_model_factory("llama", num_kv_heads=2, initializer_range=0.02)


def _workload(n: int = 14, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Looping and random prompts; greedy, seeded sampled, penalties, min_tokens with stop ids,
    logprobs, logit bias; lengths that end drafts at max_tokens."""
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        loop = [rng.randrange(3, 500) for _ in range(rng.randint(2, 6))]
        prompts.append((loop * 30)[:rng.randint(8, 50)] if i % 3 else [rng.randrange(3, 500) for _ in range(20)])
        kind = i % 7
        base = dict(max_tokens=rng.randint(5, 40), ignore_eos=True, temperature=0.0)
        if kind == 1:
            base.update(temperature=0.8, top_k=20, top_p=0.9, seed=rng.randrange(2**31))
        elif kind == 2:
            base.update(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)
        elif kind == 3:
            base.update(min_tokens=4, stop_token_ids=[loop[0], loop[-1]], ignore_eos=False)
        elif kind == 4:
            base.update(logprobs=True, top_logprobs=2)
        elif kind == 5:
            base.update(temperature=1.0, min_p=0.05, seed=rng.randrange(2**31), logprobs=True)
        elif kind == 6:
            base.update(logit_bias={loop[0]: 2.0, 7: -3.0})
        params.append(SamplingParams(**base))
    return prompts, params


@pytest.fixture(scope="module")
def workload():
    return _workload()


@pytest.fixture(scope="module")
def reference(model, workload):
    """The plain engine (no speculation, serial loop, roomy pool)."""
    llm = LLM(model, **CPU, page_size=4, enable_overlap=False)
    outs = llm.generate(*workload)
    assert all(o["finish_reason"] in ("stop", "length") for o in outs)
    return outs


def _same(outs, reference) -> None:
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in reference]
    assert [o["finish_reason"] for o in outs] == [o["finish_reason"] for o in reference]
    for got, ref in zip(outs, reference):
        if ref["logprobs"] is not None:
            torch.testing.assert_close(got["logprobs"], ref["logprobs"], atol=1e-4, rtol=1e-4)
        if ref["top_logprobs"] is not None:
            assert [t.ids for t in got["top_logprobs"]] == [t.ids for t in ref["top_logprobs"]]


def _forced(llm: LLM, source) -> "FixedDrafts":
    """`source` drafts for every request at every step (drafts cost nothing: none pauses)."""
    llm.scheduler.spec.cost = StepCost.free(llm.scheduler.spec.k)
    llm.scheduler.spec.source = source
    return source


def _no_leaks(llm: LLM) -> None:
    assert llm.scheduler.leaks() == []
    assert llm.scheduler.stats().locked_pages == 0


class FixedDrafts:
    """A draft source that knows each request's plain output: `right` drafts it, otherwise
    every draft is wrong. Past the output's end it drafts junk (never emitted)."""

    def __init__(self, prompts, outputs, right: bool, vocab: int) -> None:
        self.expected = {tuple(p): o["token_ids"] for p, o in zip(prompts, outputs)}
        self.right, self.vocab = right, vocab
        self.within_output = 0  # drafted ids that are the output's own

    def draft(self, req: Req, k: int) -> list[int]:
        out = self.expected[tuple(req.input_ids)]
        n = len(req.output_ids)
        self.within_output += len(out[n:n + k])
        truth = (out[n:n + k] + [3] * k)[:k]
        return truth if self.right else [(t + 1) % self.vocab for t in truth]

    def would_draft(self, req: Req) -> bool:
        return True


# ---------------------------------------------------------------- drafts


def test_ngram_index_drafts_the_latest_continuation_of_the_longest_suffix():
    index = NgramIndex(1, 3)
    index.extend([1, 2, 3, 9, 1, 2, 3, 4, 5, 2, 3])
    # suffix (1?) (2, 3): the longest indexed suffix is (2, 3) at its latest occurrence -> 4 5 2 3
    assert index.draft(3) == [4, 5, 2]
    index.extend([7])
    assert index.lookup() is None and index.draft(4) == []  # 7 never occurred before
    loop = NgramIndex(2, 2)
    loop.extend([5, 6, 7, 5, 6])
    assert loop.draft(6) == [7, 5, 6, 7, 5, 6], "a continuation reaching the end goes on as a loop"


def test_ngram_index_catches_up_incrementally():
    req = Req(1, [4, 5, 6, 4, 5], SamplingParams(max_tokens=20), 0, 20)
    inc = NgramIndex(1, 4)
    inc.catch_up(req)
    for token in [6, 4, 8, 4, 5, 6]:
        req.output_ids.append(token)
        inc.catch_up(req)
    full = NgramIndex(1, 4)
    full.extend(req.input_ids + req.output_ids)
    assert inc == full and inc.draft(4) == full.draft(4) == [4, 8, 4, 5]


def test_kept_ids_are_the_accepted_drafts_and_the_next_target():
    assert accepted_length([1, 2, 3], [1, 2, 9, 4]) == 2
    assert kept_ids([1, 2, 3], [1, 2, 9, 4]) == [1, 2, 9]
    assert kept_ids([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert kept_ids([1, 2, 3], [7, 2, 3, 4]) == [7]


def test_drafts_are_verified_only_as_far_as_they_pay():
    """A decode step of 4 units, each draft adding 1: at acceptance rate r the j-th draft saves
    r^j steps of one request; at a larger batch a request's share of a step is smaller."""
    cost = StepCost(4.0, [0.0, 1.0, 2.0, 3.0, 4.0])
    assert cost.best_drafts(1.0, 1, 4) == 4 and cost.best_drafts(0.2, 1, 4) == 0
    assert 0 < cost.best_drafts(0.5, 1, 4) < 4
    assert cost.best_drafts(0.9, 8, 4) < cost.best_drafts(0.9, 1, 4)
    assert StepCost.free(4).best_drafts(0.01, 64, 4) == 4


def test_a_request_that_does_not_draft_keeps_scoring_shadow_drafts():
    payoff = Payoff()
    assert payoff.rate == 0.5
    req = Req(1, [4, 5, 6], SamplingParams(max_tokens=20), 0, 20)
    payoff.keep_shadow(req, [7, 8, 9])
    req.output_ids += [7]
    payoff.check_shadow(req)
    assert payoff.shadow, "undecided while every id so far matches"
    req.output_ids += [8, 1]
    payoff.check_shadow(req)
    assert not payoff.shadow and payoff.rate > 0.5  # two accepted, one rejection
    for _ in range(10):
        payoff.record(4, 0)
    assert payoff.rate < 0.1


def test_exact_match_acceptance_is_rejection_sampling():
    """Over many seeds, the sampler's id at one position equals a drafted id with probability
    p(draft), and when it does not it follows p without the draft, renormalised: the rule
    min(1, p/q) with a point-mass q, and its residual."""
    n, draft = 20000, 2
    probs = torch.tensor([0.1, 0.05, 0.4, 0.25, 0.2])
    logits = probs.log().repeat(n, 1)
    params = [SamplingParams(temperature=1.0)] * n
    st = SamplingTensors.build(params, list(range(n)), [5] * n)
    ids = Sampler().sample(logits, st)
    accepted = (ids == draft).float().mean().item()
    assert abs(accepted - 0.4) < 4 * (0.4 * 0.6 / n) ** 0.5
    rejected = ids[ids != draft]
    residual = torch.bincount(rejected, minlength=5).float() / rejected.numel()
    expected = probs.clone()
    expected[draft] = 0
    expected /= expected.sum()
    assert 0.5 * (residual - expected).abs().sum().item() < 0.02


# ---------------------------------------------------------------- outputs equal the plain engine


@pytest.mark.parametrize("variant", [
    dict(enable_overlap=False),
    dict(enable_overlap=True),
    dict(chunk_size=8, step_token_budget=40, prefill_budget=40),
    dict(enable_mixed_batches=False, max_prefill_steps_in_a_row=1),
    dict(max_total_tokens=160, max_running_requests=16),
    dict(page_size=1, speculative_num_tokens=7, ngram_max=5),
], ids=["normal", "overlap", "chunked_mixed", "prefill_first", "tiny_pool", "page1_k7"])
def test_speculation_equals_plain(model, workload, reference, variant):
    llm = LLM(model, **{**CPU, "page_size": 4, **SPEC, **variant})
    _same(llm.generate(*workload), reference)
    stats = llm.scheduler.spec.stats
    assert stats.verify_rows > 0 and 0 < stats.accepted_tokens <= stats.draft_tokens
    if variant.get("max_total_tokens") == 160:
        assert llm.scheduler.num_retracted > 0, "the pool should force retraction"
    _no_leaks(llm)


@pytest.mark.parametrize("right", [True, False], ids=["always_right", "always_wrong"])
def test_forced_drafts_accept_all_or_nothing_with_the_same_output(model, workload, reference, right):
    llm = LLM(model, **CPU, page_size=4, **SPEC)
    source = _forced(llm, FixedDrafts(workload[0], reference, right, llm.scheduler.vocab_size))
    outs = llm.generate(*workload)
    _same(outs, reference)
    stats = llm.scheduler.spec.stats
    assert stats.draft_tokens > 0 and source.within_output > 0
    # right: every draft that is the output's own is accepted (those past its end are junk)
    assert stats.accepted_tokens == (source.within_output if right else 0)
    _no_leaks(llm)


def test_stops_inside_an_accepted_run_cut_it_there(model):
    """EOS (after min_tokens), a stop id, a stop string and max_tokens, each inside a run of
    drafts that are all right up to it (and junk past it)."""
    plain = LLM(model, **CPU, page_size=4, enable_overlap=False)
    prompt = [11, 12, 13, 14] * 6
    free = plain.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    ids = free["token_ids"]
    eos = plain.scheduler.eos_ids[0]
    stop_text = plain.tokenizer.decode([ids[9]])
    cases = [SamplingParams(max_tokens=30, temperature=0, min_tokens=6, logit_bias={eos: 50.0}),
             SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[ids[7]]),
             SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop_text]),
             SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)]
    expected = [plain.generate([prompt], p)[0] for p in cases]
    assert [len(e["token_ids"]) for e in expected][0] == 7 and expected[0]["token_ids"][-1] == eos
    assert [e["finish_reason"] for e in expected] == ["stop", "stop", "stop", "length"]
    llm = LLM(model, **CPU, page_size=4, **SPEC)
    for params, want in zip(cases, expected):
        _forced(llm, FixedDrafts([prompt], [want], True, llm.scheduler.vocab_size))
        got = llm.generate([prompt], params)[0]
        assert (got["token_ids"], got["finish_reason"], got["text"]) == \
            (want["token_ids"], want["finish_reason"], want["text"])
    assert llm.scheduler.spec.stats.accepted_tokens > 0
    _no_leaks(llm)


def test_the_radix_cache_holds_committed_tokens_only(model, workload, reference):
    """Always-wrong drafts put junk into the token pool and the KV pool at every step; none of it
    may reach the tree. A second run on the warm cache gives the same outputs."""
    llm = LLM(model, **CPU, page_size=2, **SPEC)
    _forced(llm, FixedDrafts(workload[0], reference, False, llm.scheduler.vocab_size))
    _same(llm.generate(*workload), reference)
    committed = [tuple(p + o["token_ids"]) for p, o in zip(workload[0], reference)]
    for path in _tree_paths(llm.scheduler.cache.tree.root):
        assert any(c[:len(path)] == path for c in committed), "a cached path holds tokens never emitted"
    hits = llm.scheduler.cache.hit_tokens
    _same(llm.generate(*workload), reference)
    assert llm.scheduler.cache.hit_tokens > hits
    _no_leaks(llm)


def _tree_paths(node, prefix=()):
    if not node.children:
        yield prefix
    for child in node.children.values():
        yield from _tree_paths(child, prefix + child.key)


def test_structured_output_with_drafts_the_grammar_refuses(model):
    """Constrained requests draft too: drafts are cut where the grammar refuses them, every
    verify row gets the mask of the state after the drafts before it."""
    from minisgl_backend.structured_outputs import StructuredOutputs

    prompts = [[40, 41, 42, 40, 41, 42, 40], [50, 51, 50, 51]]
    params = [SamplingParams(max_tokens=24, temperature=0, structured_outputs=StructuredOutputs(regex="(ab|cd)+x")),
              SamplingParams(max_tokens=24, temperature=0.7, seed=5,
                             structured_outputs=StructuredOutputs(choice=["alpha beta", "alpha gamma"]))]
    plain = LLM(model, **CPU, page_size=4, enable_overlap=False).generate(prompts, params)
    assert all(o["finish_reason"] in ("stop", "length") and o["token_ids"] for o in plain)
    llm = LLM(model, **CPU, page_size=4, **SPEC)
    for right in (False, True):
        _forced(llm, FixedDrafts(prompts, plain, right, llm.scheduler.vocab_size))
        assert [o["token_ids"] for o in llm.generate(prompts, params)] == [o["token_ids"] for o in plain]
        assert (llm.scheduler.spec.stats.accepted_tokens > 0) == right
        _no_leaks(llm)


# ---------------------------------------------------------------- sampled outputs


def test_sampled_tokens_follow_the_same_distribution(model):
    """Temperature 1 over each position's 2 most likely ids: the 3-token outputs of 400 seeds
    with speculation (the draft is always the greedy continuation, right about half the time)
    against 400 other seeds without, as two samples over the 8 possible outputs: a two-sample
    chi-square statistic below its 0.1 % quantile (7 degrees of freedom: 24.3). And the ids of
    one seed are the same either way (a position's noise is fixed by seed and position)."""
    prompt = [21, 22, 23, 21, 22, 23, 21]
    n = 400
    params = lambda seeds: [SamplingParams(max_tokens=3, temperature=1.0, top_k=2, seed=s,  # noqa: E731
                                           ignore_eos=True) for s in seeds]
    plain = LLM(model, **CPU, page_size=4, enable_overlap=False)
    spec = LLM(model, **CPU, page_size=4, max_running_requests=32, **SPEC)
    greedy = plain.generate([prompt], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    _forced(spec, FixedDrafts([prompt], [greedy], True, spec.scheduler.vocab_size))
    with_spec = [tuple(o["token_ids"]) for o in spec.generate([prompt] * n, params(range(n)))]
    assert with_spec[:40] == [tuple(o["token_ids"]) for o in plain.generate([prompt] * 40, params(range(40)))]
    without = [tuple(o["token_ids"]) for o in plain.generate([prompt] * n, params(range(n, 2 * n)))]
    stats = spec.scheduler.spec.stats
    assert 0.2 < stats.accepted_tokens / stats.draft_tokens < 0.8, "drafts right about half the time"
    a, b = _histogram(with_spec), _histogram(without)
    assert len(set(a) | set(b)) <= 8
    chi2 = sum((a.get(o, 0) - b.get(o, 0)) ** 2 / (a.get(o, 0) + b.get(o, 0)) for o in set(a) | set(b))
    assert chi2 < 24.3, (chi2, a, b)
    _no_leaks(spec)


def _histogram(values: list) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


# ---------------------------------------------------------------- the switch, faults, aborts, stats


def test_speculation_runs_only_while_few_requests_decode(model, workload, reference):
    llm = LLM(model, **CPU, page_size=4, **{**SPEC, "speculative_max_batch_size": 3})
    spec = llm.scheduler.spec
    seen = []
    plan = spec.plan

    def recording_plan(decodable):
        drafts = plan(decodable)
        if drafts:
            seen.append(len(decodable))
        return drafts

    spec.plan = recording_plan
    _same(llm.generate(*workload), reference)
    assert seen and max(seen) <= 3
    off = LLM(model, **CPU, page_size=4, **{**SPEC, "speculative_max_batch_size": 0})
    _same(off.generate(*workload), reference)
    assert off.scheduler.spec.stats.verify_rows == 0


def test_abort_during_a_verify_step_leaves_nothing_locked(model, workload, reference):
    n = len(workload[0])
    for overlap in (False, True):
        llm = LLM(model, **CPU, page_size=2, enable_overlap=overlap, **SPEC)
        _forced(llm, FixedDrafts(workload[0], reference, True, llm.scheduler.vocab_size))
        deliver = llm.io.listener

        def abort_odd_at_first_tokens(events):
            deliver(events)
            for ev in events:
                for rid in ev.rids if isinstance(ev, TokenBatch) else []:
                    if rid % 2:
                        llm.io.put(AbortMsg(rid))

        llm.io.listener = abort_odd_at_first_tokens
        outs = llm.generate(*workload)
        for i, out in enumerate(outs):
            assert out["token_ids"] == reference[i]["token_ids"][:len(out["token_ids"])]
        assert sum(o["finish_reason"] == "abort" for o in outs) >= n // 4
        _no_leaks(llm)


def test_a_failing_request_in_a_verify_step_fails_alone(model, workload, reference):
    prompts, params = workload
    seed = params[1].seed
    llm = LLM(model, **CPU, page_size=4, inject_sampling_fault_seed=seed, inject_sampling_fault_step=3, **SPEC)
    _forced(llm, FixedDrafts(prompts, reference, True, llm.scheduler.vocab_size))
    outs = llm.generate(prompts, params)
    assert outs[1]["finish_reason"] == "error"
    assert [o["token_ids"] for i, o in enumerate(outs) if i != 1] == \
        [o["token_ids"] for i, o in enumerate(reference) if i != 1]
    _no_leaks(llm)


def test_stats_and_metrics_carry_acceptance(model, workload, reference):
    from minisgl_backend.triton.metrics import EngineMetrics

    llm = LLM(model, **CPU, page_size=4, **SPEC)
    llm.generate(*workload)
    stats = llm.scheduler.stats()
    s = llm.scheduler.spec.stats
    assert (stats.spec_verify_rows, stats.spec_draft_tokens, stats.spec_accepted_tokens) == \
        (s.verify_rows, s.draft_tokens, s.accepted_tokens)
    families: dict[str, _FakeMetric] = {}
    metrics = EngineMetrics(_fake_pb(families), "minisgl", "1")
    metrics.update_stats(stats)
    assert families["minisgl_spec_accepted_tokens_total"].value == s.accepted_tokens
    assert families["minisgl_spec_draft_tokens_total"].value == s.draft_tokens
    assert families["minisgl_spec_acceptance_ratio"].value == pytest.approx(s.accepted_tokens / s.draft_tokens)
    assert families["minisgl_spec_tokens_per_verify_step"].value == pytest.approx(
        1 + s.accepted_tokens / s.verify_rows)
    later = StatsEvent(**{**{f: getattr(stats, f) for f in stats.__struct_fields__},
                          "spec_verify_rows": s.verify_rows + 2, "spec_draft_tokens": s.draft_tokens + 8,
                          "spec_accepted_tokens": s.accepted_tokens + 2})
    metrics.update_stats(later)
    assert families["minisgl_spec_accepted_tokens_total"].value == s.accepted_tokens + 2
    assert families["minisgl_spec_acceptance_ratio"].value == pytest.approx(0.25)
    assert families["minisgl_spec_tokens_per_verify_step"].value == pytest.approx(2.0)


class _FakeMetric:
    def __init__(self) -> None:
        self.value = 0.0

    def increment(self, amount: float) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value

    def observe(self, value: float) -> None:
        pass


def _fake_pb(families: dict[str, _FakeMetric]):
    class Family:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels, buckets=None):
            return families.setdefault(self.name, _FakeMetric()) if len(labels) == 2 else _FakeMetric()

    return type("Pb", (), {"MetricFamily": Family})


def test_tp2_speculation_equals_tp1(model, workload, reference):
    prompts, params = workload[0][:6], workload[1][:6]
    with LLM(model, **CPU, page_size=4, tp_size=2, **SPEC) as llm:
        outs = llm.generate(prompts, params)
        stats = llm.frontend.stats()
    _same(outs, reference[:6])
    assert stats is not None and stats.spec_accepted_tokens > 0 and stats.locked_pages == 0
