"""Structured output, unit level: constraint parsing, request parsing, the bitmask, the compile
cache and the matcher's re-synchronisation."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from minisgl_backend.grammar.bitmask import GrammarMask, apply_mask
from minisgl_backend.grammar.compiler import GrammarCompiler, GrammarError, choice_ebnf
from minisgl_backend.structured_outputs import StructuredOutputs, parse_structured_outputs
from minisgl_backend.grammar.matcher import GrammarState
from minisgl_backend.sampling_params import SamplingParams
from minisgl_backend.triton.parsing import RequestError, parse_request

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}


@pytest.mark.parametrize("raw,expected", [
    ({"json": SCHEMA}, StructuredOutputs(json=json.dumps(SCHEMA, separators=(",", ":")))),
    ({"json": json.dumps(SCHEMA, indent=2)}, StructuredOutputs(json=json.dumps(SCHEMA, separators=(",", ":")))),
    ({"json_object": True}, StructuredOutputs(json_object=True)),
    ({"regex": "[0-9]+"}, StructuredOutputs(regex="[0-9]+")),
    ({"choice": ["a", "b"]}, StructuredOutputs(choice=["a", "b"])),
    ({"grammar": 'root ::= "x"'}, StructuredOutputs(grammar='root ::= "x"')),
    ('{"regex": "x+", "json": null}', StructuredOutputs(regex="x+")),
])
def test_constraint_forms(raw, expected):
    assert parse_structured_outputs(raw) == expected
    assert SamplingParams(structured_outputs=raw).structured_outputs == expected


def test_equal_schemas_share_a_key_and_keep_key_order():
    a = parse_structured_outputs({"json": SCHEMA})
    b = parse_structured_outputs({"json": json.dumps(SCHEMA, indent=4)})
    assert a.key == b.key and a.json.index('"b"') < a.json.index('"a"')


@pytest.mark.parametrize("values,match", [
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one of .*got regex and choice"),
    ({"structured_outputs": {}}, "exactly one of .*got none"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice must be a non-empty list"),
    ({"structured_outputs": {"choice": ["a", 3]}}, "structured_outputs.choice must hold non-empty strings"),
    ({"structured_outputs": {"json": 5}}, "structured_outputs.json must be a JSON schema"),
    ({"structured_outputs": {"json": "{nope"}}, "structured_outputs.json is not valid JSON"),
    ({"structured_outputs": {"json_object": "yes"}}, "json_object must be true"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex must be a non-empty string"),
    ({"structured_outputs": {"regexp": "a"}}, "unknown key 'regexp'"),
    ({"structured_outputs": ["a"]}, "structured_outputs must be an object"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex and guided_choice were both given"),
    ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "'structured_outputs' and 'guided_regex'"),
])
def test_bad_constraints_name_the_field(values, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams.from_dict(values)


def test_legacy_keys():
    assert SamplingParams.from_dict({"guided_json": SCHEMA}).structured_outputs.json is not None
    assert SamplingParams.from_dict({"guided_regex": "a+"}).structured_outputs == StructuredOutputs(regex="a+")
    assert SamplingParams.from_dict({"guided_choice": '["x", "y"]'}).structured_outputs.choice == ["x", "y"]
    assert SamplingParams.from_dict({"guided_grammar": 'root ::= "a"'}).structured_outputs.grammar == 'root ::= "a"'


def _getter(**tensors):
    arrays = {k: np.array([v.encode()], dtype=object) if isinstance(v, str) else v for k, v in tensors.items()}
    return lambda name: arrays.get(name)


def test_triton_request_parsing_accepts_every_place():
    sp = json.dumps({"max_tokens": 8, "structured_outputs": {"choice": ["yes", "no"]}})
    parsed = parse_request(_getter(text_input="hi", sampling_parameters=sp))
    assert parsed.params.structured_outputs == StructuredOutputs(choice=["yes", "no"])
    parsed = parse_request(_getter(text_input="hi"), json.dumps({"structured_outputs": json.dumps({"regex": "a+"})}))
    assert parsed.params.structured_outputs == StructuredOutputs(regex="a+")
    parsed = parse_request(_getter(text_input="hi"), json.dumps({"guided_json": json.dumps(SCHEMA)}))
    assert parsed.params.structured_outputs.kind == "json"
    with pytest.raises(RequestError, match="structured_outputs needs exactly one"):
        parse_request(_getter(text_input="hi", sampling_parameters=json.dumps(
            {"structured_outputs": {"regex": "a", "grammar": "root ::= \"a\""}})))
    with pytest.raises(RequestError, match="guided_choice must be a non-empty list"):
        parse_request(_getter(text_input="hi", sampling_parameters=json.dumps({"guided_choice": []})))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_mask_forbids_exactly_the_zero_bits_and_leaves_free_rows_alone(dtype):
    torch.manual_seed(0)
    vocab = 200  # not a multiple of 32: the last word is partly padding
    logits = torch.randn(5, vocab).to(dtype)
    words = torch.randint(-2**31, 2**31 - 1, (5, (vocab + 31) // 32), dtype=torch.int32)
    words[[0, 2, 4]] = -1  # free rows
    ours = apply_mask(logits.clone(), GrammarMask(words, 2))
    bits = [[(int(words[b, v // 32]) >> (v % 32)) & 1 for v in range(vocab)] for b in range(5)]
    expected = torch.where(torch.tensor(bits, dtype=torch.bool), logits, torch.tensor(float("-inf"), dtype=dtype))
    assert torch.equal(ours, expected)
    assert torch.equal(ours[[0, 2, 4]], logits[[0, 2, 4]])
    assert (ours[1] == float("-inf")).any() and (ours[1] != float("-inf")).any()


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_llama):
    from minisgl_backend.tokenizer import load_tokenizer

    return load_tokenizer(tiny_llama)


def test_compile_cache_is_bounded_lru_and_runs_off_thread(tiny_tokenizer):
    threads = []

    def factory():
        threads.append(threading.current_thread().name)
        return tiny_tokenizer

    compiler = GrammarCompiler(factory, vocab_size=576, stop_token_ids=[tiny_tokenizer.eos_token_id], capacity=2)
    try:
        a, b, c = (StructuredOutputs(regex=r) for r in ("a+", "b+", "c+"))
        fa = compiler.submit(a)
        assert compiler.submit(StructuredOutputs(regex="a+")) is fa
        fa.result(timeout=60)
        compiler.submit(b).result(timeout=60)
        compiler.submit(a)  # a is now the most recent: c evicts b
        compiler.submit(c).result(timeout=60)
        assert compiler.submit(a) is fa
        assert compiler.num_compiled == 3
        compiler.submit(b).result(timeout=60)
        assert compiler.num_compiled == 4, "b was evicted and compiles again"
        assert threads and threads[0].startswith("grammar-compile")
        with pytest.raises(GrammarError, match="structured_outputs.regex does not compile: .*Unclosed"):
            compiler.submit(StructuredOutputs(regex="[0-9")).result(timeout=60)
        with pytest.raises(GrammarError, match="structured_outputs.json does not compile: .*foo"):
            compiler.submit(parse_structured_outputs({"json": {"type": "foo"}})).result(timeout=60)
    finally:
        compiler.close()


def test_matcher_sync_rolls_back_and_refeeds(tiny_tokenizer):
    compiler = GrammarCompiler(lambda: tiny_tokenizer, 576, [tiny_tokenizer.eos_token_id])
    try:
        grammar = compiler.submit(StructuredOutputs(choice=["abc", "abd"])).result(timeout=60)
    finally:
        compiler.close()
    state = GrammarState(grammar)
    abc = [tiny_tokenizer.convert_tokens_to_ids(ch) for ch in "abc"]
    abd = abc[:2] + [tiny_tokenizer.convert_tokens_to_ids("d")]
    assert all(state.accept(t) for t in abc) and state.can_end()
    assert not state.accept(abc[0]), "the grammar is complete: only EOS may follow"
    assert state.sync(abd) == 1 and state.accepted == abd and state.can_end()
    assert state.sync(abd[:1]) == 2 and not state.can_end()
    assert state.accept(tiny_tokenizer.convert_tokens_to_ids("b"))
    with pytest.raises(ValueError, match="does not match the grammar"):
        state.sync(abd[:1] + abd[:1])


def test_choice_ebnf_escapes():
    assert choice_ebnf(['a"b', "c\\d\n"]) == r'root ::= "a\"b" | "c\\d\n"'


def test_length_bounded_json_strings_are_valid_json(tiny_tokenizer):
    """xgrammar 0.2.8 lets raw control characters into strings with maxLength; ours does not."""
    schema = {"type": "object", "properties": {"b": {"type": "string", "maxLength": 4}}, "required": ["b"]}
    compiler = GrammarCompiler(lambda: tiny_tokenizer, 576, [tiny_tokenizer.eos_token_id])
    try:
        grammar = compiler.submit(parse_structured_outputs({"json": schema})).result(timeout=60)
    finally:
        compiler.close()
    for text, ok in [('{"b": "a\tb"}', False), ('{"b": "a\\tb\\u00e9"}', True), ('{"b": "abcde"}', False),
                     ('{"b": "abcd"}', True)]:
        state = GrammarState(grammar)
        accepted = all(state.accept(t) for t in tiny_tokenizer.encode(text, add_special_tokens=False))
        assert (accepted and state.can_end()) == ok, text
