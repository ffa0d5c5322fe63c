"""Device sampling: greedy, seeded Gumbel-max, filters, penalties, counter-based noise."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from minisgl_backend.sampling_params import SamplingParams
from minisgl_backend.engine.sampling import (
    PenaltyInputs,
    Sampler,
    SamplingTensors,
    apply_penalties,
    apply_temperature_and_filters,
    hash32,
    hash_uniform,
)

SP = SamplingParams


def _pad_ids(seqs, device):
    width = max((len(x) for x in seqs), default=0)
    out = torch.full((len(seqs), max(width, 1)), -1, dtype=torch.int64)
    for i, x in enumerate(seqs):
        if len(x):
            out[i, :len(x)] = torch.as_tensor(list(x), dtype=torch.int64)
    return out.to(device)


def penalties_from_lists(output_ids, vocab_size, device="cpu", prompt_ids=None):
    """PenaltyInputs from Python lists of ids (the engine builds them from the token pool)."""
    prompts = _pad_ids(prompt_ids, device) if prompt_ids is not None else None
    return PenaltyInputs.build(_pad_ids(output_ids, device), vocab_size, prompts)


def _logits(b: int, v: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale


def _sample(logits, params, seeds=None, steps=None, **kw):
    n = len(params)
    st = SamplingTensors.build(params, seeds if seeds is not None else list(range(n)),
                               steps if steps is not None else [0] * n, logits.device)
    return Sampler().sample(logits, st, **kw)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


# ---------------------------------------------------------------- greedy


def test_greedy_is_argmax():
    logits = _logits(16, 300)
    ids = _sample(logits, [SP(temperature=0.0)] * 16)
    assert torch.equal(ids, logits.argmax(1))
    assert ids.dtype == torch.int64


@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0, 7.5])
def test_top_k_1_is_greedy(temperature):
    logits = _logits(12, 200, seed=1)
    ids = _sample(logits, [SP(temperature=temperature, top_k=1, top_p=0.5)] * 12,
                  seeds=list(range(100, 112)))
    assert torch.equal(ids, logits.argmax(1))


def test_all_greedy_flags_and_fast_path():
    st = SamplingTensors.build([SP(temperature=0.0), SP(top_k=1)], [1, 2], [0, 0], "cpu")
    assert st.all_greedy and st.any_greedy
    assert not (st.need_top_k or st.need_top_p or st.need_min_p or st.need_penalties)
    st = SamplingTensors.build([SP(temperature=0.0), SP(top_p=0.9)], [1, 2], [0, 0], "cpu")
    assert not st.all_greedy and st.any_greedy and st.need_top_p and not st.need_top_k
    assert st.sample_rows.tolist() == [1]


def test_plain_greedy_shortcut_builds_what_the_general_path_builds(monkeypatch):
    import minisgl_backend.engine.sampling as sampling

    params = [SP(temperature=0.0), SP(top_k=1, temperature=0.7), SP(temperature=0.0, top_p=0.5)]
    fast = SamplingTensors.build(params, [1, 2, 3], [0, 4, 9], "cpu")
    monkeypatch.setattr(sampling, "plain_greedy", lambda p: False)
    assert SamplingTensors.build(params, [1, 2, 3], [0, 4, 9], "cpu") == fast
    assert fast.all_greedy and fast.temperatures is None
    # a penalty or logprobs leaves the shortcut: their rows need tensors
    monkeypatch.undo()
    assert SamplingTensors.build([SP(temperature=0.0, repetition_penalty=1.2)], [1], [0], "cpu").need_penalties
    assert SamplingTensors.build([SP(temperature=0.0, logprobs=True)], [1], [0], "cpu").need_logprobs


def test_logprobs_are_raw_log_softmax():
    logits = _logits(6, 50, seed=2)
    params = [SP(temperature=0.0), SP(temperature=0.5, top_k=3), SP(repetition_penalty=1.5),
              SP(temperature=2.0), SP(top_p=0.2), SP(min_p=0.3)]
    st = SamplingTensors.build(params, [1, 2, 3, 4, 5, 6], [0] * 6, "cpu")
    pen = penalties_from_lists([[1, 2]] * 6, 50)
    ids, lps = Sampler().sample(logits, st, pen, return_logprobs=True)
    ref = torch.log_softmax(logits, 1).gather(1, ids[:, None]).squeeze(1)
    torch.testing.assert_close(lps, ref)
    assert st.need_logprobs is False
    assert SamplingTensors.build([SP(logprobs=True)], [0], [0], "cpu").need_logprobs


# ---------------------------------------------------------------- seeded sampling


def test_seeded_reproducible():
    logits = _logits(8, 500, seed=3, scale=1.0)
    params = [SP(temperature=1.0)] * 8
    a = _sample(logits, params, seeds=[7] * 8, steps=list(range(8)))
    b = _sample(logits.clone(), params, seeds=[7] * 8, steps=list(range(8)))
    assert torch.equal(a, b)


def test_independent_of_batch_mates_and_position():
    v = 400
    target = _logits(1, v, seed=4, scale=1.0)[0]
    tp = SP(temperature=0.9, top_k=100, top_p=0.95, min_p=0.01)
    alone = _sample(target[None], [tp], seeds=[1234], steps=[5])[0]
    others = _logits(7, v, seed=5)
    other_params = [SP(temperature=0.0), SP(temperature=1.5), SP(top_k=3), SP(top_p=0.3),
                    SP(min_p=0.2), SP(temperature=0.7, top_k=50), SP()]
    for pos in range(8):
        logits = torch.cat([others[:pos], target[None], others[pos:]])
        params = other_params[:pos] + [tp] + other_params[pos:]
        seeds = list(range(50 + pos, 57 + pos))
        seeds.insert(pos, 1234)
        steps = [9] * 7
        steps.insert(pos, 5)
        ids = _sample(logits, params, seeds=seeds, steps=steps)
        assert ids[pos] == alone, pos
    # alone with penalties active for batch-mates only
    logits = torch.cat([target[None], others[:3]])
    params = [tp, SP(repetition_penalty=1.3), SP(presence_penalty=1.0), SP(temperature=0.0)]
    st = SamplingTensors.build(params, [1234, 1, 2, 3], [5, 0, 0, 0], "cpu")
    pen = penalties_from_lists([[], [1, 2, 3], [4, 4], [5]], v, prompt_ids=[[], [9], [8], []])
    assert Sampler().sample(logits, st, pen)[0] == alone


def test_different_seeds_and_steps_differ():
    logits = torch.zeros(64, 1000)  # uniform distribution
    by_seed = _sample(logits, [SP()] * 64, seeds=list(range(64)))
    assert len(set(by_seed.tolist())) > 50
    by_step = _sample(logits, [SP()] * 64, seeds=[42] * 64, steps=list(range(64)))
    assert len(set(by_step.tolist())) > 50
    big_seeds = [2**63 - 1 - i for i in range(64)]
    by_big = _sample(logits, [SP()] * 64, seeds=big_seeds)
    assert len(set(by_big.tolist())) > 50


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_distribution_matches_softmax(temperature):
    v, n = 10, 20000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -2.0, 0.8])
    logits = base.expand(n, v).contiguous()
    probs = torch.softmax(base / temperature, 0)
    # many seeds at one step
    ids = _sample(logits, [SP(temperature=temperature)] * n, seeds=list(range(n)))
    counts = torch.bincount(ids, minlength=v).float()
    assert _chi2(counts, probs) < 35.0  # df = 9: p ~ 1e-4
    # one seed, many steps
    ids = _sample(logits, [SP(temperature=temperature)] * n, seeds=[99] * n, steps=list(range(n)))
    counts = torch.bincount(ids, minlength=v).float()
    assert _chi2(counts, probs) < 35.0


def test_filtered_distribution_is_renormalised():
    v, n = 10, 20000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -2.0, 0.8])
    logits = base.expand(n, v).contiguous()
    ids = _sample(logits, [SP(top_k=4)] * n, seeds=list(range(n)))
    top4 = torch.topk(base, 4).indices
    probs = torch.zeros(v)
    probs[top4] = torch.softmax(base[top4], 0)
    assert _chi2(torch.bincount(ids, minlength=v).float(), probs) < 35.0


# ---------------------------------------------------------------- filters


def test_top_k_never_outside():
    v, n = 300, 512
    logits = _logits(1, v, seed=6, scale=0.5).expand(n, v).contiguous()
    for k in (2, 5, 40):
        ids = _sample(logits, [SP(temperature=3.0, top_k=k)] * n, seeds=list(range(n)))
        allowed = set(torch.topk(logits[0], k).indices.tolist())
        assert set(ids.tolist()) <= allowed
        assert len(set(ids.tolist())) == k  # high temperature: the whole top-k shows up


def test_top_k_mixed_with_off_rows():
    v = 100
    logits = _logits(1, v, seed=7, scale=0.1).expand(256, v).contiguous()
    params = [SP(temperature=5.0, top_k=3) if i % 2 else SP(temperature=5.0) for i in range(256)]
    ids = _sample(logits, params, seeds=list(range(256)))
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    assert set(ids[1::2].tolist()) <= allowed
    assert len(set(ids[0::2].tolist()) - allowed) > 10


def _top_p_allowed(logits_row: torch.Tensor, top_p: float, temperature: float = 1.0) -> set[int]:
    probs = torch.softmax(logits_row.double() / temperature, 0)
    order = torch.argsort(probs, descending=True)
    allowed, mass = set(), 0.0
    for i in order.tolist():
        allowed.add(i)
        mass += float(probs[i])
        if mass >= top_p:
            break
    return allowed


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8])
def test_top_p_never_outside(top_p):
    v, n = 200, 512
    row = _logits(1, v, seed=8, scale=1.5)[0]
    logits = row.expand(n, v).contiguous()
    ids = _sample(logits, [SP(temperature=1.0, top_p=top_p)] * n, seeds=list(range(n)))
    allowed = _top_p_allowed(row, top_p)
    assert set(ids.tolist()) <= allowed
    # filter function directly: exactly the allowed set survives
    st = SamplingTensors.build([SP(top_p=top_p)], [0], [0], "cpu")
    kept = torch.isfinite(apply_temperature_and_filters(row[None], st))[0].nonzero().flatten()
    assert set(kept.tolist()) == allowed


def test_top_k_then_top_p_uses_renormalised_top_k():
    row = torch.tensor([3.0, 2.9, 2.8, 0.0, -1.0, -2.0])
    st = SamplingTensors.build([SP(top_k=2, top_p=0.6)], [0], [0], "cpu")
    kept = torch.isfinite(apply_temperature_and_filters(row[None], st))[0]
    # within the top 2 the first has ~52.5 % < 60 %, so both stay; nothing else
    assert kept.tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.6])
def test_min_p_never_outside(min_p):
    v, n = 200, 512
    row = _logits(1, v, seed=9, scale=1.5)[0]
    logits = row.expand(n, v).contiguous()
    ids = _sample(logits, [SP(temperature=1.0, min_p=min_p)] * n, seeds=list(range(n)))
    probs = torch.softmax(row, 0)
    allowed = set((probs >= min_p * probs.max()).nonzero().flatten().tolist())
    assert set(ids.tolist()) <= allowed


def test_temperature_applies_before_filters():
    row = torch.tensor([1.0, 0.0, -1.0, -3.0])
    st = SamplingTensors.build([SP(temperature=0.25, min_p=0.05)], [0], [0], "cpu")
    out = apply_temperature_and_filters(row[None], st)[0]
    # at T=0.25 the scaled logits are 4, 0, -4, -12; min-p keeps logit >= 4 + ln(0.05) ~ 1.0
    assert torch.isfinite(out).tolist() == [True, False, False, False]
    torch.testing.assert_close(out[0], torch.tensor(4.0))


def test_suppress_ids():
    logits = _logits(4, 30, seed=10)
    top = logits.argmax(1)
    sup = torch.stack([top, torch.full_like(top, -1)], 1)
    st = SamplingTensors.build([SP(temperature=0.0), SP(temperature=0.0), SP(), SP(top_k=1)],
                               [0, 1, 2, 3], [0] * 4, "cpu")
    ids = Sampler().sample(logits, st, suppress_ids=sup)
    assert not (ids == top).any()
    masked = logits.clone()
    masked[torch.arange(4), top] = float("-inf")
    assert ids[0] == masked[0].argmax() and ids[3] == masked[3].argmax()


# ---------------------------------------------------------------- penalties


def test_penalties_unit():
    v = 8
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 0.0, 3.0, -2.0],
                           [2.0, -1.0, 0.5, -0.5, 1.0, 0.0, 3.0, -2.0],
                           [2.0, -1.0, 0.5, -0.5, 1.0, 0.0, 3.0, -2.0]])
    params = [SP(repetition_penalty=2.0),
              SP(presence_penalty=0.5, frequency_penalty=0.25),
              SP()]
    st = SamplingTensors.build(params, [0, 1, 2], [0, 0, 0], "cpu")
    assert st.need_penalties and st.need_repetition and st.need_presence_frequency
    outputs = [[0, 1, 1], [0, 1, 1, 1], [0, 1]]
    prompts = [[3, 5], [2, 6], [4]]
    pen = penalties_from_lists(outputs, v, prompt_ids=prompts)
    out = apply_penalties(logits, st, pen)
    # row 0: HF repetition over prompt + output tokens {0, 1, 3, 5}
    exp0 = [1.0, -2.0, 0.5, -1.0, 1.0, 0.0, 3.0, -2.0]
    # row 1: OpenAI presence/frequency over OUTPUT tokens only: counts 0 -> 1, 1 -> 3
    exp1 = [2.0 - 0.25 - 0.5, -1.0 - 0.75 - 0.5, 0.5, -0.5, 1.0, 0.0, 3.0, -2.0]
    torch.testing.assert_close(out[0], torch.tensor(exp0))
    torch.testing.assert_close(out[1], torch.tensor(exp1))
    assert torch.equal(out[2], logits[2])  # neutral row untouched
    # counts from padded tensors equal counts from lists
    padded = torch.tensor([[0, 1, 1, -1], [0, 1, 1, 1], [0, 1, -1, -1]])
    pen2 = PenaltyInputs.build(padded, v, torch.tensor([[3, 5], [2, 6], [4, -1]]))
    assert torch.equal(pen2.output_counts, pen.output_counts) and torch.equal(pen2.seen, pen.seen)
    assert pen.output_counts[1].tolist() == [1, 3, 0, 0, 0, 0, 0, 0]
    # first step: no outputs yet (int32 ids, as read from a token pool)
    empty = PenaltyInputs.build(torch.zeros(3, 0, dtype=torch.int32), v,
                                torch.tensor([[3, 5], [2, -1], [-1, -1]], dtype=torch.int32))
    assert empty.output_counts.sum() == 0 and empty.seen.sum(1).tolist() == [2, 1, 0]


def test_penalties_affect_greedy_and_are_required():
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    st = SamplingTensors.build([SP(temperature=0.0, repetition_penalty=2.0)], [0], [0], "cpu")
    pen = penalties_from_lists([[0]], 3)
    assert Sampler().sample(logits, st, pen).tolist() == [1]  # 5/2 < 4
    with pytest.raises(ValueError):
        Sampler().sample(logits, st)


def test_build_validates_lengths():
    with pytest.raises(ValueError):
        SamplingTensors.build([SP()], [1, 2], [0], "cpu")


# ---------------------------------------------------------------- noise


def _lowbias32_ref(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


@settings(max_examples=200, deadline=None)
@given(hs.lists(hs.integers(0, 2**32 - 1), min_size=1, max_size=20))
def test_hash32_matches_reference(xs):
    got = hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [_lowbias32_ref(x) for x in xs]


def test_uniform_from_the_extreme_bit_patterns_stays_inside_the_open_interval():
    """All-ones and all-zeros hash bits: u never rounds to 1.0 (an infinite Gumbel sample) or 0."""
    from minisgl_backend.engine.sampling import _uniform_from_bits_

    u = _uniform_from_bits_(torch.tensor([0, 2**32 - 1, 2**31, 2**32 - 2**10], dtype=torch.int64))
    assert bool((u > 0).all()) and bool((u < 1).all()) and u.unique().numel() == 4
    assert bool(torch.isfinite(-torch.log(-torch.log(u))).all())


@settings(max_examples=100, deadline=None)
@given(hs.lists(hs.tuples(hs.integers(0, 2**63 - 1), hs.integers(0, 2**40)), min_size=1, max_size=6),
       hs.integers(1, 300))
def test_hash_uniform_open_interval_and_deterministic(rows, vocab):
    seeds = torch.tensor([s for s, _ in rows], dtype=torch.int64)
    steps = torch.tensor([t for _, t in rows], dtype=torch.int64)
    u = hash_uniform(seeds, steps, vocab)
    assert u.shape == (len(rows), vocab) and u.dtype == torch.float32
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert torch.equal(u, hash_uniform(seeds.clone(), steps.clone(), vocab))
    # each row alone gives the same noise (no dependence on the rest of the batch)
    assert torch.equal(u[-1:], hash_uniform(seeds[-1:], steps[-1:], vocab))
    # a longer vocabulary extends, never changes, the noise of an index
    assert torch.equal(u, hash_uniform(seeds, steps, vocab + 7)[:, :vocab])


def test_hash_uniform_statistics():
    u = hash_uniform(torch.arange(64), torch.zeros(64, dtype=torch.int64), 4096)
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    # neighbouring seeds / indices are uncorrelated
    c_rows = torch.corrcoef(u[:2])[0, 1]
    c_cols = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]
    assert abs(float(c_rows)) < 0.05 and abs(float(c_cols)) < 0.02


# ---------------------------------------------------------------- device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    v, b = 5000, 32
    logits = _logits(b, v, seed=11, scale=2.0)
    params = [SP(temperature=0.8, top_k=50 if i % 3 == 0 else -1, top_p=0.9 if i % 2 else 1.0,
                 min_p=0.02 if i % 5 == 0 else 0.0, repetition_penalty=1.2 if i % 4 == 0 else 1.0)
              if i % 7 else SP(temperature=0.0) for i in range(b)]
    seeds, steps = list(range(b)), [i * 3 for i in range(b)]
    outs = [[i, i + 1] for i in range(b)]
    res = {}
    for dev in ("cpu", "cuda"):
        st = SamplingTensors.build(params, seeds, steps, dev)
        pen = penalties_from_lists(outs, v, dev, prompt_ids=outs)
        res[dev] = Sampler().sample(logits.to(dev), st, pen).cpu()
    assert torch.equal(hash_uniform(torch.arange(4), torch.arange(4), 100),
                       hash_uniform(torch.arange(4).cuda(), torch.arange(4).cuda(), 100).cpu())
    assert (res["cpu"] == res["cuda"]).float().mean() > 0.95  # log() may differ by an ulp
    assert math.isfinite(float(logits.sum()))


def test_argmax_rows_equals_torch_argmax_with_ties_nan_and_masked_rows():
    from minisgl_backend.engine.sampling import argmax_rows

    torch.manual_seed(0)
    x = torch.randn(6, 300)
    x[1, 7] = x[1, 250] = 50.0  # a tie: the first index wins
    x[2, :] = float("-inf")  # a row that suppresses everything
    x[3, 10] = float("nan")  # NaN counts as the maximum
    x[4, 5:] = float("-inf")
    got = argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=1))
    assert got[1].item() == 7 and got[3].item() == 10
    assert torch.equal(argmax_rows(x.double()), x.double().argmax(dim=1))
    assert torch.equal(argmax_rows(x[:, :100]), x[:, :100].argmax(dim=1))  # a strided view
    with torch.inference_mode():
        y = torch.randn(4, 50)
        assert torch.equal(argmax_rows(y), y.argmax(dim=1))


def test_requests_know_from_which_step_their_argmax_is_their_next_id():
    """`Req.argmax_from`: the CUDA graph's argmax stands as the next id for plain greedy rows
    once min_tokens no longer suppresses EOS; never for sampled, penalised or logprob rows."""
    import sys

    from minisgl_backend.batch import Req

    def req(**params):
        return Req(rid=0, input_ids=[1, 2, 3], params=SamplingParams(**params), seed=0, max_output_tokens=8)

    assert req(temperature=0).argmax_from == 3
    assert req(temperature=0, min_tokens=2).argmax_from == 5
    assert req(top_k=1, temperature=0.7).argmax_from == 3
    for params in (dict(temperature=0.7), dict(temperature=0, logprobs=True),
                   dict(temperature=0, repetition_penalty=1.2), dict(temperature=0, presence_penalty=0.5)):
        assert req(**params).argmax_from == sys.maxsize, params
