"""Tool call parsers: whole answers, and the same answers streamed in every chunking."""

from __future__ import annotations

import json
import random
import re

import pytest

from minisgl_backend.openai.tool_parsers import (TOOL_PARSERS, ToolCall, finish_reason, make_tool_parser,
                                                 parser_for_template)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
TIME = '{"name": "get_time", "arguments": {}}'
TRICKY_ARGS = {"q": "</tool_call> <tool_call> [TOOL_CALLS] <|python_tag|> {\"x\": [1, {}]} ]}",
               "nested": {"a": [1, 2.5, {"b": None, "c": [True, False]}], "e": "\\\"quoted\\\""}}
TRICKY = json.dumps({"name": "search", "arguments": TRICKY_ARGS})
UNICODE_ARGS = {"city": "Zürich 東京 😀", "note": "naïve façade"}

# (parser, answer, content, [(name, arguments)])
CASES = [
    # hermes
    ("hermes", "The capital of France is Paris.", "The capital of France is Paris.", []),
    ("hermes", "", "", []),
    ("hermes", " \n ", " \n ", []),
    ("hermes", f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>", "Let me check.\n",
     [("get_weather", {"city": "Paris", "days": 3})]),
    ("hermes", f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>\n", None,
     [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})]),
    ("hermes", f"<tool_call>{TRICKY}</tool_call>", None, [("search", TRICKY_ARGS)]),
    ("hermes", "Voilà 😀: <tool_call>" + json.dumps({"name": "get_weather", "arguments": UNICODE_ARGS},
                                                     ensure_ascii=False) + "</tool_call>",
     "Voilà 😀: ", [("get_weather", UNICODE_ARGS)]),
    ("hermes", "<tool_call>not json</tool_call> ok", "<tool_call>not json</tool_call> ok", []),
    ("hermes", '<tool_call>{"name": 1, "arguments": {}}</tool_call>',
     '<tool_call>{"name": 1, "arguments": {}}</tool_call>', []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "f"}</tool_call>', '<tool_call>{"name": "f"}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ("hermes", f"<tool_call>{WEATHER} trailing</tool_call>", f"<tool_call>{WEATHER} trailing</tool_call>", []),
    ("hermes", f"<tool_call>{{bad}}</tool_call>\n<tool_call>{TIME}</tool_call>", "<tool_call>{bad}</tool_call>\n",
     [("get_time", {})]),
    ("hermes", f"<tool_call>\n{WEATHER}\n", None, [("get_weather", {"city": "Paris", "days": 3})]),
    ("hermes", f"<tool_call>\n{WEATHER}\n</tool", None, [("get_weather", {"city": "Paris", "days": 3})]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"ci',
     '<tool_call>\n{"name": "get_weather", "arguments": {"ci', []),
    ("hermes", f"<tool_call>{TIME}</tool_call>\nDone.", "\nDone.", [("get_time", {})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", {"a": 1})]),
    ("hermes", '<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>', None, [("f", {"a": 1})]),
    ("hermes", "Use <tool_ca and <tool_call without a body.", "Use <tool_ca and <tool_call without a body.", []),
    ("hermes", "a <tool_call><tool_call>" + TIME + "</tool_call>", "a <tool_call>", [("get_time", {})]),
    # llama3_json
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    ("llama3_json", '\n\n {"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {}}', None, [("get_time", {})]),
    ("llama3_json", 'Checking.<|python_tag|>{"name": "get_time", "parameters": {}}', "Checking.", [("get_time", {})]),
    ("llama3_json", '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": [2]}} ;{"name": "c", '
                    '"arguments": {}}', None, [("a", {"x": 1}), ("b", {"y": [2]}), ("c", {})]),
    ("llama3_json", '{"name": "a", "parameters": {}}; not a call', "; not a call", [("a", {})]),
    ("llama3_json", '{"name": "a", "parameters": {}} and more', " and more", [("a", {})]),
    ("llama3_json", '{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ("llama3_json", 'Here: {"name": "a", "parameters": {}}', 'Here: {"name": "a", "parameters": {}}', []),
    ("llama3_json", "{unbalanced", "{unbalanced", []),
    ("llama3_json", '<|python_tag|>print("hi")', '<|python_tag|>print("hi")', []),
    ("llama3_json", json.dumps({"name": "search", "parameters": TRICKY_ARGS}), None, [("search", TRICKY_ARGS)]),
    ("llama3_json", json.dumps({"name": "w", "parameters": UNICODE_ARGS}, ensure_ascii=False), None,
     [("w", UNICODE_ARGS)]),
    # mistral
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
                '"arguments": {}, "id": "abcDEF123"}]', None, [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "get_time", "arguments": {}}]', "Sure.", [("get_time", {})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}', None,
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("mistral", '[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{"tz": "UTC"}', None, [("get_time", {"tz": "UTC"})]),
    ("mistral", '[{"name": "get_time", "arguments": {}}]', None, [("get_time", {})]),
    ("mistral", "[a link](http://example.com)", "[a link](http://example.com)", []),
    ("mistral", "[TOOL_CALLS] oops, no call", "[TOOL_CALLS] oops, no call", []),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"nom": "g"}]',
     '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"nom": "g"}]', []),
    ("mistral", "[TOOL_CALLS][]", "[TOOL_CALLS][]", []),
    ("mistral", "[TOOL_CALLS]f[ARGS][1]", "[TOOL_CALLS]f[ARGS][1]", []),
    ("mistral", "[TOOL_CALLS]f[ARGS]{\"a\": ", "[TOOL_CALLS]f[ARGS]{\"a\": ", []),
    ("mistral", "[TOOL_CALLS]f(x)", "[TOOL_CALLS]f(x)", []),
    ("mistral", "[TOOL_CALLS]search[ARGS]" + json.dumps(TRICKY_ARGS), None, [("search", TRICKY_ARGS)]),
    ("mistral", "Zürich: [TOOL_CALLS]w[ARGS]" + json.dumps(UNICODE_ARGS, ensure_ascii=False), "Zürich: ",
     [("w", UNICODE_ARGS)]),
    ("mistral", 'x [{"name": "f", "arguments": {}}]', 'x [{"name": "f", "arguments": {}}]', []),
]
IDS = [f"{p}-{i}" for i, (p, *_rest) in enumerate(CASES)]


def _expected_calls(calls):
    return [(name, json.dumps(args, ensure_ascii=False)) for name, args in calls]


@pytest.mark.parametrize("parser_name,text,content,calls", CASES, ids=IDS)
def test_parse(parser_name, text, content, calls):
    got_content, got_calls = make_tool_parser(parser_name).parse(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == _expected_calls(calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


def _stream(parser_name: str, chunks: list[str]) -> tuple[list[dict], list[ToolCall]]:
    stream = make_tool_parser(parser_name).stream()
    deltas = []
    for chunk in chunks:
        deltas += stream.feed(chunk)
    deltas += stream.finish()
    return deltas, stream.calls


def _assemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    """Content and calls as an OpenAI client assembles them, checking each delta's shape."""
    content, calls = "", []
    for delta in deltas:
        assert len(delta) == 1, delta
        if "content" in delta:
            assert isinstance(delta["content"], str) and delta["content"]
            content += delta["content"]
            continue
        (piece,) = delta["tool_calls"]
        if piece["index"] == len(calls):  # a call's first delta
            assert set(piece) == {"index", "id", "type", "function"} and piece["type"] == "function"
            assert set(piece["function"]) == {"name", "arguments"} and piece["function"]["arguments"] == ""
            calls.append({"id": piece["id"], "name": piece["function"]["name"], "arguments": ""})
        else:
            assert piece["index"] == len(calls) - 1, "fragments continue the latest call"
            assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
            calls[-1]["arguments"] += piece["function"]["arguments"]
    return content, calls


def _chunkings(text: str, seed: int):
    yield [text]
    yield list(text)
    for k in range(1, len(text)):
        yield [text[:k], text[k:]]
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("parser_name,text,content,calls", CASES, ids=IDS)
def test_stream_equals_parse_in_every_chunking(parser_name, text, content, calls):
    expected = _expected_calls(calls)
    for i, chunks in enumerate(_chunkings(text, seed=len(text))):
        deltas, stream_calls = _stream(parser_name, chunks)
        got_content, got_calls = _assemble(deltas)
        assert got_content == (content or ""), chunks
        assert [(c["name"], c["arguments"]) for c in got_calls] == expected, chunks
        assert [c["id"] for c in got_calls] == [c.id for c in stream_calls]
        assert len({c["id"] for c in got_calls}) == len(got_calls)


def test_stream_holds_back_what_may_become_a_call():
    stream = make_tool_parser("hermes").stream()
    assert stream.feed("Hello <tool_") == [{"content": "Hello "}]
    assert stream.feed("call>\n") == []
    assert stream.feed('{"name": "f", "arguments": {"a": "</tool_call>"}}') == []
    first, args = stream.feed("\n</tool_call>")
    assert first == {"tool_calls": [{"index": 0, "id": stream.calls[0].id, "type": "function",
                                     "function": {"name": "f", "arguments": ""}}]}
    assert args == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": "</tool_call>"}'}}]}
    assert stream.feed("\n") == [] and stream.feed("<") == []
    assert stream.feed("b>ok") == [{"content": "\n<b>ok"}]
    assert stream.finish() == []


def test_stream_ends_an_open_marker_as_content():
    stream = make_tool_parser("mistral").stream()
    assert stream.feed("See [TOOL_") == [{"content": "See "}]
    assert stream.finish() == [{"content": "[TOOL_"}]
    stream = make_tool_parser("llama3_json").stream()
    assert stream.feed('  {"name": "f", "par') == []
    assert stream.finish() == [{"content": '  {"name": "f", "par'}]


def test_call_ids_and_openai_shape():
    _, calls = make_tool_parser("hermes").parse(f"<tool_call>{TIME}</tool_call>")
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0].id)
    assert calls[0].as_openai() == {"id": calls[0].id, "type": "function",
                                    "function": {"name": "get_time", "arguments": "{}"}}
    _, calls = make_tool_parser("mistral").parse("[TOOL_CALLS]get_time[ARGS]{}")
    assert re.fullmatch(r"[A-Za-z0-9]{9}", calls[0].id), "Mistral's templates take 9 alphanumerics only"


def test_finish_reason():
    call = [ToolCall("call_x", "f", "{}")]
    assert finish_reason("stop", call) == "tool_calls"
    assert finish_reason("length", call) == "length"
    assert finish_reason("stop", []) == "stop"
    assert finish_reason(None, []) == "stop"


def test_registry():
    assert {"hermes", "llama3_json", "mistral"} <= set(TOOL_PARSERS)
    assert make_tool_parser("qwen").name == "hermes"
    with pytest.raises(ValueError, match="unknown tool call parser 'nope'; use one of hermes"):
        make_tool_parser("nope")


# Chat templates, cut to the lines that write tools and calls (as the models publish them).
QWEN25 = """{%- if tools %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": "
        "<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- endif %}
{%- for message in messages %}{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}
    {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.function.name }}{{- '", "arguments": ' }}
    {{- tool_call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}{%- endif %}{%- endfor %}"""
QWEN3_CODER = """{%- for tool_call in message.tool_calls %}
    {{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
    {%- for args_name, args_value in tool_call.arguments|items %}{{- '<parameter=' + args_name + '>\\n' }}
    {%- endfor %}{{- '</function>\\n</tool_call>' }}{%- endfor %}"""
LLAMA31 = """{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function "
        "call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
{%- endif %}
{%- if builtin_tools is defined and tool_call.name in builtin_tools %}
    {{- "<|python_tag|>" + tool_call.name + ".call(" }}
{%- else %}
    {{- '{"name": "' + tool_call.name + '", ' }}{{- '"parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}" }}
{%- endif %}"""
LLAMA32_JSON = """{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    'value}.' }}
{{- "Do not use variables.\\n\\n" }}"""
MISTRAL_V03 = """{%- elif message.tool_calls is defined and message.tool_calls is not none %}
    {{- "[TOOL_CALLS] [" }}{%- for tool_call in message.tool_calls %}{{- tool_call.function|tojson }}{%- endfor %}
    {{- "]" + eos_token }}"""
MISTRAL_V11 = """{%- for tool_call in message.tool_calls %}
    {{- '[TOOL_CALLS]' + tool_call.function.name }}{{- '[CALL_ID]' + tool_call.id }}
    {{- '[ARGS]' + tool_call['function']['arguments']|tojson }}{%- endfor %}"""
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("template,expected", [
    (QWEN25, "hermes"), (QWEN3_CODER, None), (LLAMA31, "llama3_json"), (LLAMA32_JSON, "llama3_json"),
    (MISTRAL_V03, "mistral"), (MISTRAL_V11, "mistral"), (CHATML, None), (None, None), ("", None),
    (QWEN25 + MISTRAL_V03, None),
])
def test_parser_for_template(template, expected):
    assert parser_for_template(template) == expected


def test_parser_for_the_tiny_tokenizers_template():
    from minisgl_backend.tools.tiny_tokenizer import CHAT_TEMPLATE

    assert parser_for_template(CHAT_TEMPLATE) is None


# Pieces of calls, markers, halves of markers and JSON punctuation, for answers made at random.
FRAGMENTS = {
    "hermes": ["<tool_call>", "</tool_call>", "<tool_", "</tool", '{"name": "f", "arguments": {"a": 1}}', "{bad}",
               '{"name": "g", "arguments": {}}', "{", "}", '"', "\\", "\n", " ", "hi", "ü", '{"s": "</tool_call>"}'],
    "llama3_json": ["<|python_tag|>", "<|py", '{"name": "f", "parameters": {"a": 1}}', '{"name": "g", "arguments": {}}',
                    ";", " ", "\n", "{", "}", "[", "]", '"', "x", "é", '{"name": 1}'],
    "mistral": ["[TOOL_CALLS]", "[TOOL_", "[ARGS]", "[CALL_ID]", "abc", "f", '{"a": 1}', "[", "]", "{", "}", " ",
                '[{"name": "f", "arguments": {}}]', "\n", '"', "😀", '{"name": "g", "arguments": {"b": [1]}}'],
}


@pytest.mark.parametrize("parser_name", sorted(FRAGMENTS))
def test_random_answers_stream_as_they_parse(parser_name):
    rng = random.Random(parser_name)
    parser = make_tool_parser(parser_name)
    for _ in range(150):
        text = "".join(rng.choice(FRAGMENTS[parser_name]) for _ in range(rng.randint(0, 8)))
        content, calls = parser.parse(text)
        expected = [(c.name, c.arguments) for c in calls]
        for chunks in [list(text)] + [[text[:k], text[k:]] for k in range(1, len(text))]:
            got_content, got_calls = _assemble(_stream(parser_name, chunks)[0])
            assert got_content == (content or "") and [(c["name"], c["arguments"]) for c in got_calls] == expected, \
                (text, chunks)
