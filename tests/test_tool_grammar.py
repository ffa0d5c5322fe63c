"""Tool requests: `tools` / `tool_choice` validation, and the grammars that enforce calls, compiled
with the engine's grammar compiler on the tiny tokenizer and checked token by token."""

from __future__ import annotations

import json

import pytest

from minisgl_backend.grammar.compiler import GrammarCompiler
from minisgl_backend.grammar.matcher import GrammarState
from minisgl_backend.openai.errors import OpenAIError
from minisgl_backend.openai.tool_grammar import (NO_PARAMETERS, FunctionTool, ToolRequest, tool_constraint,
                                                 validate_tools)
from minisgl_backend.openai.tool_parsers import make_tool_parser
from minisgl_backend.sampling_params import SamplingParams
from minisgl_backend.structured_outputs import parse_structured_outputs

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "days": {"type": "integer", "minimum": 1}},
                  "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": WEATHER_SCHEMA, "strict": True}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
NOTE = {"type": "function", "function": {"name": "take_note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}, "meta": {"type": "object"}}, "required": ["text"]}}}
TOOLS = [WEATHER, CLOCK, NOTE]
NAMED_CLOCK = {"type": "function", "function": {"name": "get_time"}}


# ---------------------------------------------------------------- validation


def test_validated_request():
    request = validate_tools(TOOLS, None)
    assert request.choice == "auto" and request.parses_calls and not request.forced
    assert request.tools[0] == FunctionTool("get_weather", WEATHER_SCHEMA, strict=True)
    assert request.tools[1] == FunctionTool("get_time", NO_PARAMETERS, strict=False)
    assert validate_tools(None, None) == ToolRequest((), "none")
    assert validate_tools([], "none") == ToolRequest((), "none")
    assert not validate_tools(TOOLS, "none").parses_calls
    named = validate_tools(TOOLS, NAMED_CLOCK)
    assert named.forced and named.choice == "function" and named.function == "get_time"
    assert [t.name for t in named.callable_tools()] == ["get_time"]
    assert validate_tools(TOOLS, {"type": "function", "name": "get_time"}).function == "get_time"
    assert validate_tools(TOOLS, "required").forced


def _tool(**function) -> dict:
    return {"type": "function", "function": function}


@pytest.mark.parametrize("tools,tool_choice,param,message", [
    (None, "required", "tool_choice", "tool_choice 'required' needs tools"),
    (None, "auto", "tool_choice", "tool_choice 'auto' needs tools"),
    (None, NAMED_CLOCK, "tool_choice", "the request has no tools"),
    (TOOLS, {"type": "function", "function": {"name": "get_tme"}}, "tool_choice",
     "names the function 'get_tme', which is not among the tools (get_time, get_weather, take_note)"),
    (TOOLS, "any", "tool_choice", "tool_choice 'any' is not supported"),
    (TOOLS, {"type": "function"}, "tool_choice", "tool_choice must be none, auto, required, or"),
    (TOOLS, {"type": "allowed_tools", "allowed_tools": {}}, "tool_choice", "tool_choice must be"),
    ([{"type": "web_search"}], None, "tools", "tools[0].type 'web_search' is not supported: only function tools"),
    ([WEATHER, "f"], None, "tools", "tools[1] must be an object"),
    ([{"type": "function"}], None, "tools", "tools[0].function must be an object with a name"),
    ([_tool(name="get weather")], None, "tools", "tools[0].function.name must be 1 to 128 letters"),
    ([_tool(name="")], None, "tools", "tools[0].function.name must be"),
    ([WEATHER, WEATHER], None, "tools", "tools[1].function.name 'get_weather' is given twice"),
    ([_tool(name="f", parameters="{}")], None, "tools", "tools[0].function.parameters must be a JSON schema"),
    ([_tool(name="f", parameters={"type": "object", "properties": {"a": {"type": "strin"}}})], None, "tools",
     r"tools[0].function.parameters is not a valid JSON schema: 'strin' is not valid under any of the given "
     r"schemas (at ['properties']['a']['type'])"),
    ([_tool(name="f", parameters={"type": "string"})], None, "tools", 'must describe an object (type "object")'),
    ([_tool(name="f", strict="yes")], None, "tools", "tools[0].function.strict must be true or false"),
])
def test_invalid_tool_requests_name_the_field(tools, tool_choice, param, message):
    with pytest.raises(OpenAIError) as info:
        validate_tools(tools, tool_choice)
    assert info.value.status == 400 and info.value.param == param
    assert message in info.value.message


# ---------------------------------------------------------------- grammars


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from minisgl_backend.tokenizer import load_tokenizer
    from minisgl_backend.tools.tiny_tokenizer import save_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    save_tiny_tokenizer(str(folder))
    return load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def compile_constraint(tokenizer):
    """structured_outputs -> compiled grammar, through the engine's own parsing and compiler."""
    compiler = GrammarCompiler(lambda: tokenizer, len(tokenizer), [tokenizer.eos_token_id])

    def compile_(constraint):
        params = SamplingParams(structured_outputs=json.dumps(constraint))  # as it arrives in a request
        return compiler.submit(params.structured_outputs).result(timeout=60)

    yield compile_
    compiler.close()


def _state_after(grammar, tokenizer, text: str) -> GrammarState | None:
    state = GrammarState(grammar)
    ok = all(state.accept(t) for t in tokenizer.encode(text, add_special_tokens=False))
    return state if ok else None


def _accepts(grammar, tokenizer, text: str) -> bool:
    """The whole of `text` is an answer the grammar allows, ended by EOS."""
    state = _state_after(grammar, tokenizer, text)
    return state is not None and state.can_end() and state.accept(tokenizer.eos_token_id) and state.is_terminated


def _hermes(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def _llama(name: str, arguments: str) -> str:
    return f'{{"name": "{name}", "parameters": {arguments}}}'


def _mistral_array(*calls: tuple[str, str]) -> str:
    return "[TOOL_CALLS][" + ", ".join(f'{{"name": "{n}", "arguments": {a}}}' for n, a in calls) + "]"


def _mistral_named(name: str, arguments: str) -> str:
    return f"[TOOL_CALLS]{name}[ARGS]{arguments}"


# per parser: one call, two calls (parallel), as the parser's format writes them
WRITE = {
    "hermes": (lambda *calls: "\n".join(_hermes(n, a) for n, a in calls)),
    "llama3_json": (lambda *calls: "; ".join(_llama(n, a) for n, a in calls)),
    "mistral": _mistral_array,
    "mistral_named": (lambda *calls: "".join(_mistral_named(n, a) for n, a in calls)),
}
PARSERS = ["hermes", "llama3_json", "mistral", "mistral_named"]
PARIS = '{"city": "Paris", "days": 3}'


def _parser(name: str) -> str:
    return "mistral" if name == "mistral_named" else name


def _check_round_trip(parser: str, text: str, expected: list[tuple[str, str]]) -> None:
    content, calls = make_tool_parser(_parser(parser)).parse(text)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(n, json.loads(a)) for n, a in expected]


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("parallel", [True, False])
def test_required_allows_only_calls_to_the_tools_with_valid_arguments(parser, parallel, compile_constraint,
                                                                      tokenizer):
    constraint = tool_constraint(validate_tools(TOOLS, "required"), parallel, _parser(parser))
    assert set(constraint) == {"grammar"}
    assert parse_structured_outputs(constraint).kind == "grammar"
    grammar = compile_constraint(constraint)
    write = WRITE[parser]

    good = [[("get_weather", PARIS)], [("get_weather", '{"city": "Zürich"}')], [("get_time", "{}")],
            [("take_note", '{"text": "a \\"quoted\\" \\n line", "meta": {"any": [1, {"x": null}]}}')]]
    for calls in good:
        text = write(*calls)
        assert _accepts(grammar, tokenizer, text), text
        _check_round_trip(parser, text, calls)
    two = [("get_time", "{}"), ("get_weather", PARIS)]
    assert _accepts(grammar, tokenizer, write(*two)) == parallel
    if parallel:
        _check_round_trip(parser, write(*two), two)

    bad = [write(("get_wether", PARIS)), write(("get_weather", '{"city": 3}')), write(("get_weather", "{}")),
           write(("get_weather", '{"city": "Paris", "days": 0}')), write(("get_weather", '{"city": "P", "x": 1}')),
           write(("get_weather", '{"city": "far too long a name"}')), write(("get_weather", '{"city": "a\tb"}')),
           write(("take_note", "{}")), write(("get_time", '{"tz": "UTC"}')), "Sure! " + write(("get_time", "{}")),
           "I cannot call tools.", ""]
    for text in bad:
        assert not _accepts(grammar, tokenizer, text), text


@pytest.mark.parametrize("parser", PARSERS)
def test_a_named_function_is_the_only_call_allowed(parser, compile_constraint, tokenizer):
    grammar = compile_constraint(tool_constraint(validate_tools(TOOLS, NAMED_CLOCK), None, _parser(parser)))
    write = WRITE[parser]
    assert _accepts(grammar, tokenizer, write(("get_time", "{}")))
    assert not _accepts(grammar, tokenizer, write(("get_time", '{"tz": "UTC"}'))), "no parameters: no arguments"
    assert _accepts(grammar, tokenizer, write(("get_time", "{}"), ("get_time", "{}")))  # parallel by default
    assert not _accepts(grammar, tokenizer, write(("get_weather", PARIS)))
    assert not _accepts(grammar, tokenizer, write(("get_time", "{}"), ("get_weather", PARIS)))


@pytest.mark.parametrize("parser", PARSERS)
def test_only_eos_follows_a_forced_call(parser, compile_constraint, tokenizer):
    grammar = compile_constraint(tool_constraint(validate_tools(TOOLS, "required"), False, _parser(parser)))
    state = _state_after(grammar, tokenizer, WRITE[parser](("get_time", "{}")))
    assert state is not None and state.can_end()
    for text in ("\n", " ", "x", "<"):
        (token, *_rest) = tokenizer.encode(text, add_special_tokens=False)
        assert not state.accept(token), text
    assert state.accept(tokenizer.eos_token_id) and state.is_terminated


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("parallel", [True, False])
def test_auto_with_a_strict_tool_enforces_calls_once_they_start(parser, parallel, compile_constraint, tokenizer):
    constraint = tool_constraint(validate_tools(TOOLS, "auto"), parallel, _parser(parser))
    grammar = compile_constraint(constraint)
    write = WRITE[parser]
    assert _accepts(grammar, tokenizer, "The weather is fine. No call needed.")
    assert _accepts(grammar, tokenizer, "")
    for calls in ([("get_weather", PARIS)], [("get_time", '{"whatever": true}')], [("take_note", "{}")]):
        assert _accepts(grammar, tokenizer, write(*calls)), calls  # only get_weather is strict
        _check_round_trip(parser, write(*calls), calls)
    for arguments in ('{"city": 3}', '{"town": "Paris"}'):
        assert not _accepts(grammar, tokenizer, write(("get_weather", arguments))), arguments
    assert not _accepts(grammar, tokenizer, write(("get_wether", PARIS)))
    two = write(("get_time", "{}"), ("get_weather", PARIS))
    assert _accepts(grammar, tokenizer, two) == parallel


def test_hermes_auto_allows_text_around_calls(compile_constraint, tokenizer):
    grammar = compile_constraint(tool_constraint(validate_tools(TOOLS, "auto"), True, "hermes"))
    text = "Let me look.\n" + _hermes("get_weather", PARIS) + "\nAnd the time: " + _hermes("get_time", "{}")
    assert _accepts(grammar, tokenizer, text)
    assert not _accepts(grammar, tokenizer, "Let me look.\n" + _hermes("get_weather", '{"city": null}'))


def test_nothing_is_enforced_without_a_forced_choice_or_strict_tools():
    assert tool_constraint(validate_tools(TOOLS, "none"), True, "hermes") is None
    assert tool_constraint(validate_tools(None, None), True, "hermes") is None
    assert tool_constraint(validate_tools([CLOCK, NOTE], "auto"), True, "hermes") is None
    assert tool_constraint(validate_tools([CLOCK, NOTE], "required"), True, "qwen") is not None


def test_schemas_with_definitions_compile(compile_constraint, tokenizer):
    schema = {"type": "object", "$defs": {"unit": {"enum": ["C", "F"]}},
              "properties": {"unit": {"$ref": "#/$defs/unit"}}, "required": ["unit"]}
    tools = [_tool(name="temp", parameters=schema), CLOCK]
    grammar = compile_constraint(tool_constraint(validate_tools(tools, "required"), True, "hermes"))
    assert _accepts(grammar, tokenizer, _hermes("temp", '{"unit": "C"}'))
    assert not _accepts(grammar, tokenizer, _hermes("temp", '{"unit": "K"}'))


def test_a_schema_the_grammar_cannot_enforce_is_a_400_naming_the_tool():
    broken = _tool(name="f", parameters={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})
    request = validate_tools([CLOCK, broken], "required")  # a valid JSON schema: the reference is not resolved
    with pytest.raises(OpenAIError) as info:
        tool_constraint(request, True, "hermes")
    assert info.value.status == 400 and info.value.param == "tools"
    assert info.value.message.startswith("tools[1].function.parameters cannot be enforced: ")
    assert "$defs" in info.value.message
