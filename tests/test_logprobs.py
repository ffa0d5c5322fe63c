"""Logprobs beyond the sampled token's: top alternatives with ranks, the prompt's own tokens
(`prompt_logprobs`, computed even when the prefix is cached), and `logit_bias`; checked against
transformers' log-softmax of the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minisgl_backend import LLM, SamplingParams
from minisgl_backend.triton.parsing import parse_request
from minisgl_backend.triton.responses import ResponseAssembler
from minisgl_backend.router import StreamOutput
from minisgl_backend.messages import FinishReason, TopLogprobs

PROMPT = "The quick brown fox jumps over the lazy dog"
CPU = dict(device="cpu", dtype="float32", max_total_tokens=4096, page_size=4)


@pytest.fixture(scope="module")
def hf_logprobs(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


@pytest.mark.parametrize("settings", [dict(), dict(chunk_size=5, prefill_budget=5), dict(enable_overlap=False)])
def test_prompt_logprobs_equal_transformers_even_with_the_prefix_cached(tiny_llama, hf_logprobs, settings):
    llm = LLM(tiny_llama, **CPU, **settings)
    try:
        ids = llm.router.prepare(PROMPT)
        llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0))  # the prompt is now cached
        out = llm.generate([PROMPT], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=3))[0]
        assert out["cached_tokens"] == 0, "prompt logprobs need every position computed"
        ref = hf_logprobs(ids)
        want = [ref[p, ids[p + 1]].item() for p in range(len(ids) - 1)]
        assert out["prompt_logprobs"] == pytest.approx(want, abs=1e-4)
        for p, top in enumerate(out["prompt_top_logprobs"]):
            values, alts = torch.topk(ref[p], 3)
            assert top.ids == alts.tolist() and top.logprobs == pytest.approx(values.tolist(), abs=1e-4)
            assert top.rank == int((ref[p] > ref[p, ids[p + 1]]).sum()) + 1
        again = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0))[0]
        assert again["cached_tokens"] > 0 and again["prompt_logprobs"] is None
        assert llm.scheduler.leaks() == []
    finally:
        llm.shutdown()


def test_top_logprobs_and_ranks_of_generated_tokens(tiny_llama, hf_logprobs):
    llm = LLM(tiny_llama, **CPU)
    try:
        ids = llm.router.prepare(PROMPT)
        greedy, sampled = llm.generate([PROMPT, PROMPT], [
            SamplingParams(max_tokens=5, temperature=0, logprobs=True, top_logprobs=4),
            SamplingParams(max_tokens=5, temperature=1.5, seed=3, logprobs=True, top_logprobs=2)])
        for out, k in ((greedy, 4), (sampled, 2)):
            ref = hf_logprobs(ids + out["token_ids"])
            assert len(out["top_logprobs"]) == len(out["token_ids"]) == 5
            for j, (token, top) in enumerate(zip(out["token_ids"], out["top_logprobs"])):
                row = ref[len(ids) - 1 + j]
                values, alts = torch.topk(row, k)
                assert top.ids == alts.tolist() and top.logprobs == pytest.approx(values.tolist(), abs=1e-4)
                assert top.rank == int((row > row[token]).sum()) + 1
                assert out["logprobs"][j] == pytest.approx(row[token].item(), abs=1e-4)
        assert all(top.rank == 1 for top in greedy["top_logprobs"])
        assert llm.scheduler.leaks() == []
    finally:
        llm.shutdown()


def test_logit_bias_forces_and_forbids_tokens_and_leaves_batch_mates_alone(tiny_llama):
    llm = LLM(tiny_llama, **CPU)
    try:
        plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        alone = llm.generate([PROMPT], plain)[0]["token_ids"]
        first = alone[0]
        forced, forbidden, mate = llm.generate([PROMPT] * 3, [
            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={7: 100.0}),
            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={first: -100.0}),
            plain])
        assert forced["token_ids"] == [7] * 6
        assert first not in forbidden["token_ids"]
        assert mate["token_ids"] == alone
        sampled = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=1.0, seed=1, logit_bias={9: 100.0}))
        assert sampled[0]["token_ids"][0] == 9
    finally:
        llm.shutdown()


def test_a_logit_bias_outside_the_vocabulary_is_the_clients_error(tiny_llama):
    llm = LLM(tiny_llama, **CPU)
    try:
        (out,) = llm.generate([PROMPT], SamplingParams(max_tokens=2, logit_bias={10**6: 1.0}))
        assert out["finish_reason"] == "error" and "'logit_bias' names token id 1000000" in out["error"]
    finally:
        llm.shutdown()


def test_prompt_logprobs_of_a_request_do_not_change_its_batch_mates(tiny_llama):
    llm = LLM(tiny_llama, **CPU, chunk_size=6, prefill_budget=64)
    try:
        greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        prompts = [PROMPT, "a b c d e f g h i j", "one two three"]
        alone = [llm.generate([p], greedy)[0]["token_ids"] for p in prompts]
        mixed = llm.generate(prompts, [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=0),
                                       greedy, greedy])
        assert [o["token_ids"] for o in mixed] == alone
        assert len(mixed[0]["prompt_logprobs"]) == len(llm.router.prepare(PROMPT)) - 1
        assert llm.scheduler.leaks() == []
    finally:
        llm.shutdown()


# ---------------------------------------------------------------- the Triton contract


def _parse(sampling: dict, **flags):
    tensors = {"text_input": np.array([b"hi"], dtype=object),
               "sampling_parameters": np.array([json.dumps(sampling).encode()], dtype=object),
               **{k: np.array([v]) for k, v in flags.items()}}
    return parse_request(tensors.get)


def test_logprobs_as_a_count_ask_for_alternatives_in_vllms_shape():
    req = _parse({"logprobs": 2, "max_tokens": 3}, return_logprobs=True)
    assert req.vllm_logprobs and req.params.logprobs and req.params.top_logprobs == 2
    plain = _parse({"max_tokens": 3}, return_logprobs=True)
    assert not plain.vllm_logprobs and plain.params.logprobs and plain.params.top_logprobs == 0
    asm = ResponseAssembler(req, decode_token=lambda t: f"<{t}>")
    top = [TopLogprobs(2, [5, 9], [-0.1, -0.5]), TopLogprobs(1, [6, 1], [-0.2, -3.0])]
    (reply,) = asm.on_output(StreamOutput(1, "ab", [9, 6], True, FinishReason.STOP, logprobs=[-0.5, -0.2],
                                          top_logprobs=top))
    entries = json.loads(reply.outputs["logprobs"][0])
    assert entries == [
        {"9": {"logprob": -0.5, "rank": 2, "decoded_token": "<9>"},
         "5": {"logprob": -0.1, "rank": 1, "decoded_token": "<5>"}},
        {"6": {"logprob": -0.2, "rank": 1, "decoded_token": "<6>"},
         "1": {"logprob": -3.0, "rank": 2, "decoded_token": "<1>"}}]


def test_prompt_logprobs_come_with_the_first_response():
    req = _parse({"prompt_logprobs": 1, "max_tokens": 3}, stream=True)
    asm = ResponseAssembler(req, decode_token=str)
    first = StreamOutput(1, "a", [4], False, prompt_logprobs=[-1.5], prompt_top=[TopLogprobs(3, [2], [-0.5])],
                         prompt_token_ids=[10, 11])
    (reply,) = asm.on_output(first)
    assert json.loads(reply.outputs["prompt_logprobs"][0]) == [
        None, {"11": {"logprob": -1.5, "rank": 3, "decoded_token": "11"},
               "2": {"logprob": -0.5, "rank": 1, "decoded_token": "2"}}]
    (second,) = asm.on_output(StreamOutput(1, "b", [5], True, FinishReason.STOP))
    assert "prompt_logprobs" not in second.outputs


@pytest.mark.parametrize("value,message", [
    ({"logprobs": "many"}, "'logprobs' must be a number of alternatives"),
    ({"logprobs": 21}, "'top_logprobs' must be in \\[0, 20\\]"),
    ({"prompt_logprobs": 99}, "'prompt_logprobs' must be in \\[0, 20\\]"),
    ({"logit_bias": {"3": 500}}, "'logit_bias' values must be in \\[-100, 100\\]"),
])
def test_bad_logprob_and_bias_settings_name_the_field(value, message):
    from minisgl_backend.triton.parameters import RequestError

    with pytest.raises(RequestError, match=message):
        _parse({**value, "max_tokens": 3}, return_logprobs=True)
