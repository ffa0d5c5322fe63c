"""Requests with tools: `tools` / `tool_choice` checked, and the grammar that enforces calls.

`validate_tools` turns the request's fields into a `ToolRequest`, or raises a 400 naming the
field. `tool_constraint` gives what the engine receives as `structured_outputs`: an xgrammar
EBNF grammar (`{"grammar": ...}`) written in the parser's own call format, or None when
nothing is enforced:

* `required`: the whole answer is calls (one, or one or more with `parallel_tool_calls`), each
  naming one of the tools, its arguments valid under that tool's `parameters`;
* a named function: the same, with that function only;
* `auto` with a `strict` tool: text is free until the parser's call marker, then the call is
  enforced (a strict tool's arguments by its schema, another tool's as any object);
* `auto` without strict tools, and `none`: nothing.

The grammar is built as an xgrammar structural tag and written out as EBNF, which the engine's
`grammar` kind compiles; after it only a stop token (EOS) may come.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

# The engine's JSON-schema path repairs xgrammar's strings with minLength / maxLength (they let
# raw control characters in): the same repair, for the schemas inside tool grammars.
from minisgl_backend.grammar.compiler import compiler_message, valid_json_strings
from minisgl_backend.openai.errors import OpenAIError, invalid
from minisgl_backend.openai.tool_parsers import TOOL_PARSERS

TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # OpenAI's characters, and the `.` / `:` of namespaced tools
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_MAX_BLANKS = 1  # blanks the grammar allows in a row inside arguments: a call cannot drift into whitespace


@dataclass(frozen=True)
class FunctionTool:
    name: str
    parameters: dict[str, Any]  # a JSON schema of an object
    strict: bool = False


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[FunctionTool, ...]
    choice: str  # "none", "auto", "required", or "function" (the one named by `function`)
    function: str | None = None

    @property
    def forced(self) -> bool:
        """The answer must be calls."""
        return self.choice in ("required", "function")

    @property
    def parses_calls(self) -> bool:
        """Whether the answer is searched for calls (not with `none`)."""
        return self.choice != "none" and bool(self.tools)

    def callable_tools(self) -> tuple[FunctionTool, ...]:
        if self.choice == "function":
            return tuple(t for t in self.tools if t.name == self.function)
        return self.tools


# ---------------------------------------------------------------- validation


def validate_tools(tools: list[Any] | None, tool_choice: Any) -> ToolRequest:
    """The request's `tools` and `tool_choice`, checked; OpenAIError (400) names the field."""
    checked = tuple(_function_tool(tool, i) for i, tool in enumerate(tools or []))
    names = [t.name for t in checked]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise invalid(f"tools[{i}].function.name {name!r} is given twice: tool names must be unique", "tools")
    choice, function = _tool_choice(tool_choice, set(names))
    return ToolRequest(checked, choice, function)


def _function_tool(tool: Any, i: int) -> FunctionTool:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise invalid(f"{where} must be an object", "tools")
    if tool.get("type") != "function":
        raise invalid(f"{where}.type {tool.get('type')!r} is not supported: only function tools "
                      "(type \"function\")", "tools")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise invalid(f"{where}.function must be an object with a name", "tools")
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise invalid(f"{where}.function.name must be 1 to 128 letters, digits, '_', '-', '.' or ':', "
                      f"got {name!r}", "tools")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid(f"{where}.function.strict must be true or false, got {strict!r}", "tools")
    parameters = function.get("parameters")
    return FunctionTool(name, NO_PARAMETERS if parameters is None else _parameters(parameters, where),
                        bool(strict))


def _parameters(schema: Any, where: str) -> dict[str, Any]:
    field = f"{where}.function.parameters"
    if not isinstance(schema, dict):
        raise invalid(f"{field} must be a JSON schema (an object), got {type(schema).__name__}", "tools")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        at = "".join(f"[{p!r}]" for p in exc.absolute_path)
        raise invalid(f"{field} is not a valid JSON schema: {exc.message}" + (f" (at {at})" if at else ""),
                      "tools") from None
    if schema.get("type", "object") != "object":
        raise invalid(f"{field} must describe an object (type \"object\"): arguments are a JSON object", "tools")
    return schema


def _tool_choice(tool_choice: Any, names: set[str]) -> tuple[str, str | None]:
    if tool_choice is None:
        return ("auto" if names else "none"), None
    if tool_choice == "none":
        return "none", None
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "required"):
            raise invalid(f"tool_choice {tool_choice!r} is not supported: use none, auto, required, or "
                          '{"type": "function", "function": {"name": ...}}', "tool_choice")
        if not names:
            raise invalid(f"tool_choice {tool_choice!r} needs tools: the request has none", "tool_choice")
        return tool_choice, None
    name = _named_function(tool_choice)
    if not names:
        raise invalid(f"tool_choice names the function {name!r}, but the request has no tools", "tool_choice")
    if name not in names:
        raise invalid(f"tool_choice names the function {name!r}, which is not among the tools "
                      f"({', '.join(sorted(names))})", "tool_choice")
    return "function", name


def _named_function(tool_choice: Any) -> str:
    """The name in `{"type": "function", "function": {"name": ...}}` (or the flat `{"type", "name"}`)."""
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else tool_choice.get("name")
        if isinstance(name, str) and name:
            return name
    raise invalid('tool_choice must be none, auto, required, or {"type": "function", "function": {"name": ...}}; '
                  f"got {json.dumps(tool_choice)[:200]}", "tool_choice")


# ---------------------------------------------------------------- the grammar


def tool_constraint(request: ToolRequest, parallel_tool_calls: bool | None, parser: str) -> dict[str, str] | None:
    """The `structured_outputs` that enforces the request's tool choice in `parser`'s format, or None."""
    fmt = TOOL_PARSERS[parser].name
    parallel = parallel_tool_calls is not False  # OpenAI's default is true
    if request.forced:
        structure = _forced_calls(fmt, request.callable_tools(), parallel)
    elif request.choice == "auto" and any(t.strict for t in request.tools):
        structure = _triggered_calls(fmt, request.tools, parallel)
    else:
        return None
    try:
        return {"grammar": _ebnf(json.dumps(structure, ensure_ascii=False))}
    except (RuntimeError, ValueError, TypeError) as exc:
        raise _unenforceable(request.tools, exc) from None


@functools.lru_cache(maxsize=64)
def _ebnf(structure: str) -> str:
    import xgrammar

    grammar = xgrammar.Grammar.from_structural_tag({"type": "structural_tag", "format": json.loads(structure)})
    return valid_json_strings(str(grammar))


def _unenforceable(tools: tuple[FunctionTool, ...], exc: Exception) -> OpenAIError:
    """The 400 for a schema xgrammar cannot enforce, naming the tool when one alone fails."""
    import xgrammar

    for i, tool in enumerate(tools):
        try:
            xgrammar.Grammar.from_json_schema(json.dumps(tool.parameters), any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as tool_exc:
            return invalid(f"tools[{i}].function.parameters cannot be enforced: {_message(tool_exc)}", "tools")
    return invalid(f"the tools cannot be enforced as a grammar: {_message(exc)}", "tools")


def _message(exc: Exception) -> str:
    return compiler_message(exc)


# ---------------------------------------------------------------- call formats, as xgrammar structural tags
#
# hermes:      <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>, one call per line
# llama3_json: {"name": "f", "parameters": {...}}, calls separated by "; "
# mistral:     [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...] (older templates put a blank before
#              the array), or [TOOL_CALLS]f[ARGS]{...} per call
# In each the name is one of the tools' and the arguments follow that tool's schema: always
# when calls are forced, for strict tools only in auto mode (the others' are any object).


def _forced_calls(fmt: str, tools: tuple[FunctionTool, ...], parallel: bool) -> dict:
    if fmt == "hermes":
        return _one_or_more(_hermes_tags(tools, True), "\n", parallel)
    if fmt == "llama3_json":
        return _one_or_more(_json_call_tags(tools, True, "parameters"), "; ", parallel)
    return {"type": "or", "elements": _mistral_array_tags(tools, True, parallel)
            + [_one_or_more(_mistral_named_tags(tools, True), "", parallel)]}


def _triggered_calls(fmt: str, tools: tuple[FunctionTool, ...], parallel: bool) -> dict:
    if fmt == "hermes":
        return _triggered("<tool_call>", _hermes_tags(tools, False), parallel)
    if fmt == "llama3_json":
        return _triggered('{"name": ', _json_call_tags(tools, False, "parameters"), parallel)
    tags = _mistral_array_tags(tools, False, parallel) + _mistral_named_tags(tools, False)
    return _triggered("[TOOL_CALLS]", tags, parallel)


def _json_call_tags(tools: tuple[FunctionTool, ...], forced: bool, key: str, head: str = "",
                    tail: str = "") -> list[dict]:
    """Per tool: `head{"name": "f", "key": ` arguments `}tail`."""
    return [_tag(f'{head}{{"name": {json.dumps(t.name)}, "{key}": ', _schema(t, forced), "}" + tail) for t in tools]


def _hermes_tags(tools: tuple[FunctionTool, ...], forced: bool) -> list[dict]:
    return _json_call_tags(tools, forced, "arguments", "<tool_call>\n", "\n</tool_call>")


def _mistral_array_tags(tools: tuple[FunctionTool, ...], forced: bool, parallel: bool) -> list[dict]:
    items = _one_or_more(_json_call_tags(tools, forced, "arguments"), ", ", parallel)
    return [{"type": "tag", "begin": begin, "content": items, "end": "]"}
            for begin in ("[TOOL_CALLS][", "[TOOL_CALLS] [")]


def _mistral_named_tags(tools: tuple[FunctionTool, ...], forced: bool) -> list[dict]:
    return [_tag(f"[TOOL_CALLS]{t.name}[ARGS]", _schema(t, forced), "") for t in tools]


def _schema(tool: FunctionTool, forced: bool) -> dict[str, Any]:
    return tool.parameters if forced or tool.strict else _ANY_OBJECT


def _tag(begin: str, schema: dict[str, Any], end: str) -> dict:
    content = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": _MAX_BLANKS}
    return {"type": "tag", "begin": begin, "content": content, "end": end}


def _one_or_more(tags: list[dict], separator: str, parallel: bool) -> dict:
    return {"type": "tags_with_separator", "tags": tags, "separator": separator, "at_least_one": True,
            "stop_after_first": not parallel}


def _triggered(trigger: str, tags: list[dict], parallel: bool) -> dict:
    return {"type": "triggered_tags", "triggers": [trigger], "tags": tags, "at_least_one": False,
            "stop_after_first": not parallel}
