"""RequestRouter: one step's tokens routed to their streams, coalescing, stop strings, faults."""

from __future__ import annotations

import math

import pytest

from minisgl_backend.messages import AbortMsg, ErrorKind, FinishReason, TokenBatch, TokenEvent, UserMsg
from minisgl_backend.router import RequestRouter
from minisgl_backend.sampling_params import SamplingParams
from minisgl_backend.tokenizer import load_tokenizer
from minisgl_backend.tools.tiny_tokenizer import save_tiny_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog, again and again."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(str(path))
    return load_tokenizer(str(path))


class Harness:
    """A router in deliver-hook mode: the test decides when a queued stream is taken."""

    def __init__(self, tok, **kwargs):
        self.sent, self.news, self.outs = [], [], []
        self.router = RequestRouter(tok, 1000, self.sent.append, deliver=self.news.append, **kwargs)

    def submit(self, params, stream=True, prompt="hi"):
        return self.router.submit(prompt, params, self.outs.append, stream=stream)

    def step(self, rids, tokens, ends=()):
        events = [TokenBatch(list(rids), list(tokens))] + [TokenEvent(r, [], reason) for r, reason in ends]
        assert self.router.dispatch(events) == []

    def take_all(self):
        streams, self.news[:] = list(dict.fromkeys(self.news)), []
        for stream in streams:
            out = self.router.take(stream)
            if out is not None:
                self.outs.append(out)


def test_a_lagging_taker_gets_every_id_in_one_output(tok):
    ids = tok.encode(TEXT)
    h = Harness(tok)
    rid = h.submit(SamplingParams(max_tokens=len(ids)))
    assert isinstance(h.sent[0], UserMsg) and h.sent[0].arrival_time > 0
    for i, token in enumerate(ids):  # many steps pass before the taker comes back
        h.step([rid], [token], ends=[(rid, FinishReason.LENGTH)] if i == len(ids) - 1 else [])
    h.take_all()
    (out,) = h.outs
    assert out.finished and out.token_ids == ids and out.text == tok.decode(ids) and out.num_output_tokens == len(ids)


def test_outputs_concatenate_to_the_full_text_whatever_the_coalescing(tok):
    ids = tok.encode(TEXT)
    for every in (1, 2, 5):
        h = Harness(tok)
        rid = h.submit(SamplingParams(max_tokens=len(ids)))
        for i, token in enumerate(ids):
            h.step([rid], [token], ends=[(rid, FinishReason.LENGTH)] if i == len(ids) - 1 else [])
            if i % every == 0:
                h.take_all()
        h.take_all()
        assert "".join(o.text for o in h.outs) == tok.decode(ids)
        assert sum(len(o.token_ids) for o in h.outs) == len(ids) and h.outs[-1].finished
        assert [o.finished for o in h.outs].count(True) == 1


def test_stream_interval_and_non_streamed_requests(tok):
    ids = tok.encode(TEXT)[:7]
    h = Harness(tok, stream_interval=3)
    streamed, whole = h.submit(SamplingParams(max_tokens=7)), h.submit(SamplingParams(max_tokens=7), stream=False)
    announced = []
    for i, token in enumerate(ids):
        ends = [(streamed, FinishReason.LENGTH), (whole, FinishReason.LENGTH)] if i == 6 else []
        h.step([streamed, whole], [token, token], ends)
        announced.append(sorted(s.rid for s in h.news))
        h.take_all()
    # the streamed one is worth sending every 3 ids and at its end; the other only at its end
    assert announced == [[], [], [streamed], [], [], [streamed], [streamed, whole]]
    by_rid = {}
    for out in h.outs:
        by_rid.setdefault(out.rid, []).append(out)
    assert [len(o.token_ids) for o in by_rid[streamed]] == [3, 3, 1]
    assert [len(o.token_ids) for o in by_rid[whole]] == [7] and by_rid[whole][0].text == tok.decode(ids)


def test_a_stop_string_inside_a_coalesced_output_ends_at_its_id_and_aborts(tok):
    ids = tok.encode("one two three four five six")
    h = Harness(tok)
    rid = h.submit(SamplingParams(max_tokens=50, stop=["three"]))
    h.step([rid] * len(ids), ids)  # every id arrives before the taker runs
    h.take_all()
    (out,) = h.outs
    assert out.finished and out.finish_reason is FinishReason.STOP and out.text == "one two "
    cut = next(i for i in range(1, len(ids) + 1) if "three" in tok.decode(ids[:i]))
    assert out.token_ids == ids[:cut] and out.num_output_tokens == cut
    assert h.sent[-1] == AbortMsg(rid)
    h.step([rid], [ids[0]], ends=[(rid, FinishReason.ABORT)])  # what the scheduler still sends
    h.take_all()
    assert len(h.outs) == 1, "nothing after the final output"


def test_logprobs_follow_their_ids_and_nan_means_not_asked(tok):
    ids = tok.encode(TEXT)[:4]
    h = Harness(tok)
    a, b = h.submit(SamplingParams(max_tokens=4, logprobs=True)), h.submit(SamplingParams(max_tokens=4))
    for i, token in enumerate(ids):
        ends = [(a, FinishReason.LENGTH), (b, FinishReason.LENGTH)] if i == 3 else []
        events = [TokenBatch([a, b], [token, token], [-float(i), math.nan])]
        events += [TokenEvent(r, [], reason) for r, reason in ends]
        h.router.dispatch(events)
    h.take_all()
    lp = {o.rid: o.logprobs for o in h.outs}
    assert lp[a] == [0.0, -1.0, -2.0, -3.0] and lp[b] is None


def test_a_detokenization_fault_fails_only_its_request(tok):
    ids = tok.encode(TEXT)[:6]
    h = Harness(tok, detokenize_fault_seed=4243)
    bad, good = h.submit(SamplingParams(max_tokens=6, seed=4243)), h.submit(SamplingParams(max_tokens=6, seed=1))
    for i, token in enumerate(ids):
        ends = [(bad, FinishReason.LENGTH), (good, FinishReason.LENGTH)] if i == 5 else []
        h.step([bad, good], [token, token], ends)
        h.take_all()
    outs = {rid: [o for o in h.outs if o.rid == rid] for rid in (bad, good)}
    (failed,) = outs[bad]
    assert failed.finished and failed.finish_reason is FinishReason.ERROR and failed.error_kind is ErrorKind.REQUEST
    assert "detokenization failed" in failed.error
    assert AbortMsg(bad) in h.sent, "the scheduler stops working for a request that already failed"
    assert "".join(o.text for o in outs[good]) == tok.decode(ids) and outs[good][-1].finished


def test_close_fails_every_stream_and_refuses_new_ones(tok):
    h = Harness(tok)
    rid = h.submit(SamplingParams(max_tokens=4))
    h.step([rid], [5])
    h.router.close("engine failure: boom")
    h.take_all()
    (out,) = h.outs
    assert out.finished and out.finish_reason is FinishReason.ERROR and out.error == "engine failure: boom"
    with pytest.raises(RuntimeError, match="not running"):
        h.submit(SamplingParams())
