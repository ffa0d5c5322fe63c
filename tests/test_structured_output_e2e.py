"""Structured output through the whole engine on tiny random models: whatever the weights, every
finished output matches its constraint, and unconstrained batch-mates are untouched."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from minisgl_backend import LLM, SamplingParams
from minisgl_backend.messages import AbortMsg, UserMsg

CPU = dict(device="cpu", dtype="float32", page_size=4, max_total_tokens=4096)
PROMPTS = ["Hello there", "The weather today is", "1 2 3", "What is the capital of France?"]
CHOICES = ["yes", "no", "maybe so", "it is \"quoted\""]
REGEX = "[0-9]{3}-[a-z]{2}"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "tags"],
}
EBNF = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | [a-c] [a-c]'
# a sample of every sampling method: the mask comes before all of them
METHODS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=1.5, top_k=5),
    dict(temperature=1.2, top_p=0.8),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5),
]


def _params(constraint: dict | None, i: int, max_tokens: int = 64, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, seed=100 + i, structured_outputs=constraint,
                          **{**METHODS[i % len(METHODS)], **extra})


def _check_json(text: str) -> bool:
    jsonschema.validate(json.loads(text), SCHEMA)  # raises on a mismatch
    return True


@pytest.fixture(scope="module")
def model(tiny_llama) -> str:
    return tiny_llama


@pytest.fixture(scope="module")
def llm(model):
    with LLM(model, **CPU) as engine:
        yield engine


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def any_llm(request, tiny_model_factory):
    """Two architectures (two sets of random weights) for the validity checks."""
    with LLM(tiny_model_factory(request.param, num_kv_heads=2), **CPU) as engine:
        yield engine


@pytest.mark.parametrize("constraint,check", [
    ({"choice": CHOICES}, lambda text: text in CHOICES),
    ({"regex": REGEX}, lambda text: re.fullmatch(REGEX, text)),
    ({"json": SCHEMA}, _check_json),
    ({"grammar": EBNF}, lambda text: re.fullmatch(r"\([a-c]{1,2}(,[a-c]{1,2})*\)", text)),
], ids=["choice", "regex", "json", "ebnf"])
def test_every_finished_output_matches(any_llm, constraint, check):
    n = 12
    outs = any_llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(n)],
                        [_params(constraint, i, max_tokens=96) for i in range(n)])
    stopped = [o for o in outs if o["finish_reason"] == "stop"]
    assert all(o["finish_reason"] in ("stop", "length") for o in outs), outs
    assert len(stopped) >= n // 2, "bounded constraints finish well inside max_tokens"
    for o in stopped:
        assert check(o["text"]), o["text"]
        assert o["token_ids"][-1] in any_llm.scheduler.eos_ids, "a complete grammar ends on EOS"


def test_json_object_gives_an_object(llm):
    outs = llm.generate(PROMPTS, [_params({"json_object": True}, i, max_tokens=48) for i in range(len(PROMPTS))])
    for o in outs:
        if o["finish_reason"] == "stop":
            assert isinstance(json.loads(o["text"]), dict)
        else:  # a prefix of an object, never anything else
            assert o["finish_reason"] == "length" and o["text"].lstrip().startswith("{")


def test_legacy_keys_behave_the_same(llm):
    new = llm.generate(PROMPTS[:2], [_params({"choice": CHOICES}, i) for i in range(2)])
    old = llm.generate(PROMPTS[:2], [SamplingParams.from_dict({"max_tokens": 64, "seed": 100 + i, "guided_choice": CHOICES,
                                                               **METHODS[i]}) for i in range(2)])
    assert [o["token_ids"] for o in old] == [o["token_ids"] for o in new]


def test_max_tokens_first_ends_with_length(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0, structured_outputs={"regex": "[a-z]{40}"}))[0]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 4
    assert re.fullmatch("[a-z]+", out["text"])


def test_min_tokens_and_ignore_eos_end_at_a_complete_grammar(llm):
    outs = llm.generate(PROMPTS[:2], [
        SamplingParams(max_tokens=30, temperature=0.0, min_tokens=20, structured_outputs={"choice": ["ab"]}),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, structured_outputs={"choice": ["ab"]}),
    ])
    assert [(o["text"], o["finish_reason"]) for o in outs] == [("ab", "stop"), ("ab", "stop")]
    a = llm.tokenizer.convert_tokens_to_ids("a")
    stuck = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0.0, min_tokens=3, stop_token_ids=[a],
                                                    structured_outputs={"regex": "a"}))[0]
    assert stuck["finish_reason"] == "error" and "min_tokens suppresses every token" in stuck["error"]


def test_unconstrained_batch_mates_equal_their_solo_runs(llm):
    free = [_params(None, i, max_tokens=24) for i in range(len(PROMPTS))]
    solo = [llm.generate([p], [sp])[0]["token_ids"] for p, sp in zip(PROMPTS, free)]
    constrained = [_params(c, i) for i, c in enumerate([{"json": SCHEMA}, {"regex": REGEX}, {"choice": CHOICES},
                                                        {"grammar": EBNF}])]
    outs = llm.generate(PROMPTS + PROMPTS, free + constrained)
    assert [o["token_ids"] for o in outs[:len(PROMPTS)]] == solo


def test_bad_constraints_fail_alone_with_the_compilers_message(llm):
    good = _params(None, 0, max_tokens=12)
    solo = llm.generate(PROMPTS[0], good)[0]
    outs = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]], [
        good, _params({"json": {"type": "foo"}}, 1), _params({"regex": "[0-9"}, 2),
        _params({"grammar": "root ::= undefined_rule"}, 3)])
    assert outs[0]["token_ids"] == solo["token_ids"]
    assert all(o["finish_reason"] == "error" for o in outs[1:])
    assert "structured_outputs.json does not compile" in outs[1]["error"] and "foo" in outs[1]["error"]
    assert "structured_outputs.regex does not compile" in outs[2]["error"] and "Unclosed" in outs[2]["error"]
    assert "structured_outputs.grammar does not compile" in outs[3]["error"] and "undefined_rule" in outs[3]["error"]
    assert llm.scheduler.leaks() == []


def test_prefix_cache_hit_keeps_the_constraint(llm):
    params = SamplingParams(max_tokens=64, temperature=0.0, structured_outputs={"json": SCHEMA})
    prompt = "a long shared prompt " * 4
    first, second = llm.generate(prompt, params)[0], llm.generate(prompt, params)[0]
    assert second["cached_tokens"] > 0 and second["token_ids"] == first["token_ids"]
    if first["finish_reason"] == "stop":
        _check_json(first["text"])


def test_abort_while_waiting_for_the_grammar(llm):
    sched = llm.scheduler
    sched.handle(UserMsg(10_000, [5, 6, 7], SamplingParams(max_tokens=8, structured_outputs={"regex": "[a-z]{7}q"})))
    assert sched.grammar.waiting and not sched.prefill.pending
    sched.handle(AbortMsg(10_000))
    assert not sched.grammar.waiting
    sched.run_until_idle()
    assert sched.leaks() == []


@pytest.mark.slow
def test_retraction_under_a_tiny_pool_keeps_outputs_valid(model):
    n, regex = 24, "[a-z]{30}"
    prompts = [f"{PROMPTS[i % 4]} number {i} " * 3 for i in range(n)]
    params = [SamplingParams(max_tokens=40, temperature=0.0, structured_outputs={"regex": regex}) for _ in range(n)]
    with LLM(model, **{**CPU, "max_total_tokens": 400}, max_running_requests=32) as small:
        outs = small.generate(prompts, params)
        assert small.scheduler.num_retracted > 0, "the pool should be small enough to force retraction"
        assert small.scheduler.leaks() == []
    with LLM(model, **CPU) as roomy:
        alone = [roomy.generate([p], [sp])[0]["token_ids"] for p, sp in zip(prompts, params)]
    assert [o["token_ids"] for o in outs] == alone
    for o in outs:
        assert o["finish_reason"] == "stop" and re.fullmatch(regex, o["text"]), o


def _mixed_workload(n: int = 10):
    kinds = [{"json": SCHEMA}, {"regex": REGEX}, {"choice": CHOICES}, None, {"grammar": EBNF}]
    return ([PROMPTS[i % len(PROMPTS)] + f" {i}" for i in range(n)],
            [_params(kinds[i % len(kinds)], i, max_tokens=48) for i in range(n)])


@pytest.mark.slow
def test_overlap_equals_normal_loop(model):
    prompts, params = _mixed_workload()
    results = {}
    for overlap in (False, True):
        with LLM(model, **CPU, enable_overlap=overlap) as engine:
            results[overlap] = [o["token_ids"] for o in engine.generate(prompts, params)]
            if overlap:
                assert engine.scheduler.grammar.num_overlap_syncs > 0
    assert results[True] == results[False]


@pytest.mark.slow
def test_tp2_equals_tp1(tiny_model_factory):
    path = tiny_model_factory("llama", num_kv_heads=2)
    prompts, params = _mixed_workload()
    with LLM(path, **CPU) as tp1:
        ref = tp1.generate(prompts, params)
    with LLM(path, **CPU, tp_size=2) as tp2:
        outs = tp2.generate(prompts, params)
        bad = tp2.generate(PROMPTS[0], _params({"regex": "[0-9"}, 0))[0]
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in ref]
    assert [o["finish_reason"] for o in outs] == [o["finish_reason"] for o in ref]
    assert bad["finish_reason"] == "error" and "does not compile" in bad["error"]


def test_a_model_whose_config_names_no_eos_ends_grammars_at_the_tokenizers_eos(tiny_llama, tmp_path):
    """config.json and generation_config.json without eos_token_id (the tokenizer has one)."""
    import shutil

    folder = tmp_path / "no-eos"
    shutil.copytree(tiny_llama, folder)
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            config.pop("eos_token_id", None)
            path.write_text(json.dumps(config))
    with LLM(str(folder), **CPU) as engine:
        assert engine.scheduler.eos_ids == []
        outs = engine.generate(PROMPTS[:2], [_params({"choice": CHOICES}, 0), _params({"json": SCHEMA}, 1, max_tokens=96)])
    assert outs[0]["finish_reason"] == "stop" and outs[0]["text"] in CHOICES
    assert outs[1]["finish_reason"] in ("stop", "length") and outs[1]["error"] is None
    if outs[1]["finish_reason"] == "stop":
        assert _check_json(outs[1]["text"])
