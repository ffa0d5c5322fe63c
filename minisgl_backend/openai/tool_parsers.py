"""Tool calls in a model's answer, per chat format: whole answers (`parse`) and streams (`stream`).

A parser cuts the answer into segments, left to right: content, or tool calls. A segment is
decided only once the text so far settles it: a marker that may still be completing, a call
whose JSON is still open, leave the rest undecided. So a stream decides exactly what the whole
text decides, however it is chunked: `parse` is the same machinery fed the text at once.

Formats (`TOOL_PARSERS`):

* `hermes` (Hermes 2 Pro, Qwen2.5, Qwen3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  any number, anywhere; a last call left open at the end of the answer counts.
* `llama3_json`: `{"name": ..., "parameters": {...}}` as the answer, or after `<|python_tag|>`;
  more calls after `;`.
* `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (older templates), or
  `[TOOL_CALLS]name[ARGS]{...}` per call (newer ones, with an optional `[CALL_ID]id`); also
  a bare array at the start of the answer, which is what is left when the tokenizer's special
  `[TOOL_CALLS]` is skipped in decoding.

A call is a JSON object with a non-empty string `name` and an object `arguments` (or
`parameters`); `arguments` becomes its JSON text. Text that looks like a call but is not one
stays content, as it was written. Content that is only whitespace around calls is dropped.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object

    def as_openai(self) -> dict[str, Any]:
        """The call as a chat message's `tool_calls` item."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def finish_reason(engine_reason: str | None, calls: list[ToolCall]) -> str:
    """The choice's finish reason: `tool_calls` when the answer ended with calls (a cut one stays `length`)."""
    if calls and engine_reason in (None, "stop"):
        return "tool_calls"
    return engine_reason or "stop"


# ---------------------------------------------------------------- segments


@dataclass(frozen=True)
class _Content:
    end: int


@dataclass(frozen=True)
class _Calls:
    end: int
    calls: tuple[tuple[str, str], ...]  # (name, arguments JSON)


class _Verdict:
    """What a parser says of a possible call start: not a call, or not known yet."""


NOT_A_CALL = _Verdict()
UNDECIDED = _Verdict()


@dataclass(frozen=True)
class _Cursor:
    start: int  # where the segment being decided starts
    after_call: bool  # the previous segment was a call
    num_calls: int


def _wait(final: bool) -> _Verdict:
    """An incomplete call: undecided while text may come, not a call once the answer has ended."""
    return NOT_A_CALL if final else UNDECIDED


# ---------------------------------------------------------------- JSON helpers

# A whole JSON string, a bracket, or a quote opening a string that is not closed yet.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]]|"', re.DOTALL)
_WHITESPACE = re.compile(r"\s*")


def _skip_space(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def _json_end(text: str, start: int) -> int | None:
    """The end of the object or array opening at `text[start]` (its brackets balanced outside
    strings), or None while it is open. Whether it is valid JSON is for `json.loads` to say."""
    depth = 0
    for token in _JSON_TOKEN.finditer(text, start):
        kind = token.group()
        if kind == '"':
            return None
        if kind in "{[":
            depth += 1
        elif kind in "}]":
            depth -= 1
            if depth == 0:
                return token.end()
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    """Strict JSON (Python's loader takes NaN and Infinity, which JSON does not); None if invalid."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return None


def _call_from_object(obj: Any) -> tuple[str, str] | None:
    """(name, arguments JSON) of a call object; None when it is not one."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    key = next((k for k in ("arguments", "parameters") if k in obj), None)
    if key is None:
        return None
    arguments = obj[key]
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        arguments = _loads(arguments)
    if not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


def _object_at(text: str, pos: int, final: bool) -> tuple[int, Any] | _Verdict:
    """The JSON object starting at `pos`: (its end, its value), or a verdict."""
    if pos >= len(text):
        return _wait(final)
    if text[pos] != "{":
        return NOT_A_CALL
    end = _json_end(text, pos)
    if end is None:
        return _wait(final)
    value = _loads(text[pos:end])
    return NOT_A_CALL if value is None else (end, value)


def _object_call_at(text: str, pos: int, final: bool) -> tuple[int, tuple[str, str]] | _Verdict:
    """The call object starting at `pos`: (its end, the call), or a verdict."""
    found = _object_at(text, pos, final)
    if isinstance(found, _Verdict):
        return found
    call = _call_from_object(found[1])
    return NOT_A_CALL if call is None else (found[0], call)


def _partial_marker_len(text: str, pos: int, markers: tuple[str, ...]) -> int:
    """The length of the longest suffix of `text[pos:]` that a marker starts with (and is not whole)."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text) - pos), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


# ---------------------------------------------------------------- parsers


def _hex_call_id() -> str:
    return "call_" + secrets.token_hex(12)


_ALNUM = string.ascii_letters + string.digits


def _mistral_call_id() -> str:
    """Mistral's templates refuse tool call ids that are not 9 alphanumeric characters."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


class ToolCallParser:
    """Finds tool calls in one chat format. Subclasses say where a call may start (`_candidate`)
    and what is there (`_calls_at`); cutting, content and streaming are shared."""

    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]]  # texts that open a call: a suffix that may become one is held back

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole answer: content is None when there are calls and no other text."""
        stream = self.stream()
        stream.feed(text)
        stream.finish()
        if not stream.calls:
            return text, []
        return stream.content or None, stream.calls

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    def new_call_id(self) -> str:
        return _hex_call_id()

    def next_segment(self, text: str, cursor: _Cursor, final: bool) -> _Content | _Calls | None:
        """The segment starting at `cursor.start`, or None while the text does not decide it yet."""
        pos = cursor.start
        while True:
            candidate = self._candidate(text, pos, cursor)
            if candidate is None:
                end = len(text) if final else len(text) - _partial_marker_len(text, cursor.start, self.markers)
                return _Content(end) if end > cursor.start else None
            if candidate > cursor.start:
                return _Content(candidate)
            found = self._calls_at(text, candidate, cursor, final)
            if found is UNDECIDED:
                return None
            if isinstance(found, _Calls):
                return found
            pos = candidate + 1  # not a call: its text is content, look further

    def _candidate(self, text: str, pos: int, cursor: _Cursor) -> int | None:
        """The first position at or after `pos` where a call may start."""
        found = [i for i in (text.find(m, pos) for m in self.markers) if i >= 0]
        return min(found, default=None)

    def _calls_at(self, text: str, pos: int, cursor: _Cursor, final: bool) -> _Calls | _Verdict:
        raise NotImplementedError


def _answer_start(text: str, pos: int, cursor: _Cursor) -> int | None:
    """The first non-blank position of the answer when nothing but blanks precedes it and it is at
    or after `pos` (where llama3_json and mistral may open calls without a marker)."""
    if cursor.num_calls:
        return None
    first = _skip_space(text, 0)
    return first if pos <= first < len(text) else None


class HermesParser(ToolCallParser):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    markers = (OPEN,)

    def _calls_at(self, text: str, pos: int, cursor: _Cursor, final: bool) -> _Calls | _Verdict:
        found = _object_call_at(text, _skip_space(text, pos + len(self.OPEN)), final)
        if isinstance(found, _Verdict):
            return found
        end, call = found
        after = _skip_space(text, end)
        if text.startswith(self.CLOSE, after):
            return _Calls(after + len(self.CLOSE), (call,))
        if self.CLOSE.startswith(text[after:]):  # the closing tag is still coming, or the answer ended
            return _Calls(len(text), (call,)) if final else UNDECIDED
        return NOT_A_CALL


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"
    markers = (PYTHON_TAG,)

    def _candidate(self, text: str, pos: int, cursor: _Cursor) -> int | None:
        if cursor.after_call and pos == cursor.start:
            return pos  # `; {next call}` may follow
        found = [i for i in (super()._candidate(text, pos, cursor), _answer_start(text, pos, cursor))
                 if i is not None]
        return min(found, default=None)

    def _calls_at(self, text: str, pos: int, cursor: _Cursor, final: bool) -> _Calls | _Verdict:
        if text.startswith(self.PYTHON_TAG, pos):
            start = _skip_space(text, pos + len(self.PYTHON_TAG))
        elif cursor.after_call and pos == cursor.start:
            separator = _skip_space(text, pos)
            if separator == len(text):
                return _wait(final)
            if text[separator] != ";":
                return NOT_A_CALL
            start = _skip_space(text, separator + 1)
        else:
            start = pos
        found = _object_call_at(text, start, final)
        return found if isinstance(found, _Verdict) else _Calls(found[0], (found[1],))


class MistralParser(ToolCallParser):
    name = "mistral"
    TOOL_CALLS, CALL_ID, ARGS = "[TOOL_CALLS]", "[CALL_ID]", "[ARGS]"
    markers = (TOOL_CALLS,)
    _NAME = re.compile(r"[A-Za-z0-9_.:-]*")
    _ID = re.compile(r"[A-Za-z0-9]*")

    def new_call_id(self) -> str:
        return _mistral_call_id()

    def _candidate(self, text: str, pos: int, cursor: _Cursor) -> int | None:
        marker = super()._candidate(text, pos, cursor)
        bare = _answer_start(text, pos, cursor)
        if bare is not None and text[bare] != "[":
            bare = None
        found = [i for i in (marker, bare) if i is not None]
        return min(found, default=None)

    def _calls_at(self, text: str, pos: int, cursor: _Cursor, final: bool) -> _Calls | _Verdict:
        if text.startswith(self.TOOL_CALLS, pos):
            body = _skip_space(text, pos + len(self.TOOL_CALLS))
            if body == len(text):
                return _wait(final)
            if text[body] == "[":
                return self._array_at(text, body, final)
            return self._named_call_at(text, body, final)
        if not final and self.TOOL_CALLS.startswith(text[pos:]):
            return UNDECIDED
        return self._array_at(text, pos, final)

    @staticmethod
    def _array_at(text: str, pos: int, final: bool) -> _Calls | _Verdict:
        end = _json_end(text, pos)
        if end is None:
            return _wait(final)
        items = _loads(text[pos:end])
        if not isinstance(items, list) or not items:
            return NOT_A_CALL
        calls = [_call_from_object(item) for item in items]
        if any(call is None for call in calls):
            return NOT_A_CALL
        return _Calls(end, tuple(calls))

    def _named_call_at(self, text: str, pos: int, final: bool) -> _Calls | _Verdict:
        """`name[ARGS]{...}`, or `name[CALL_ID]id[ARGS]{...}` (the model's id is not kept)."""
        name_end = self._NAME.match(text, pos).end()
        if name_end == pos:
            return NOT_A_CALL
        args_at = name_end
        if text.startswith(self.CALL_ID, name_end):
            args_at = self._ID.match(text, name_end + len(self.CALL_ID)).end()
        elif not final and self.CALL_ID.startswith(text[name_end:]):
            return UNDECIDED
        if not text.startswith(self.ARGS, args_at):
            return _wait(final) if self.ARGS.startswith(text[args_at:]) else NOT_A_CALL
        found = _object_at(text, args_at + len(self.ARGS), final)
        if isinstance(found, _Verdict):
            return found
        end, arguments = found
        if not isinstance(arguments, dict):
            return NOT_A_CALL
        return _Calls(end, ((text[pos:name_end], json.dumps(arguments, ensure_ascii=False)),))


# ---------------------------------------------------------------- streaming


class ToolCallStream:
    """One answer's text deltas in, OpenAI chat delta bodies out.

    A content delta is `{"content": text}`. A call gives two deltas once it is complete: the
    first, `{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}`,
    then `{"tool_calls": [{"index", "function": {"arguments": text}}]}` with its whole arguments.
    Nothing is sent before it is decided: the text of a call never goes out as content.
    """

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self.calls: list[ToolCall] = []
        self.content = ""  # the content sent so far
        self._text = ""
        self._pos = 0  # where the undecided text starts
        self._after_call = False
        self._held_space = ""  # a run of content between calls that is blank so far
        self._run_has_text = False  # the current run of content has shown more than blanks (it is sent as it comes)

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self._text += delta
        return self._advance(final=False)

    def finish(self) -> list[dict[str, Any]]:
        """The deltas of the rest, the answer having ended: every segment is decided now."""
        out = self._advance(final=True)
        if self._held_space and not self.calls:  # an answer of blanks only is its content
            out.append(self._content_delta(self._held_space))
        self._held_space = ""
        return _merge_content(out)

    def _advance(self, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            cursor = _Cursor(self._pos, self._after_call, len(self.calls))
            segment = self.parser.next_segment(self._text, cursor, final)
            if segment is None:
                break
            if isinstance(segment, _Content):
                out += self._take_content(self._text[self._pos:segment.end])
            else:
                out += self._take_calls(segment.calls)
            self._after_call = isinstance(segment, _Calls)
            self._pos = segment.end
        return _merge_content(out)

    def _take_content(self, text: str) -> list[dict[str, Any]]:
        if not self._run_has_text:
            self._held_space += text
            if self._held_space.isspace():
                return []
            text, self._held_space, self._run_has_text = self._held_space, "", True
        return [self._content_delta(text)]

    def _take_calls(self, calls: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
        self._held_space, self._run_has_text = "", False  # blanks between calls are dropped
        out = []
        for name, arguments in calls:
            call = ToolCall(self.parser.new_call_id(), name, arguments)
            index = len(self.calls)
            self.calls.append(call)
            out.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                        "function": {"name": name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
        return out

    def _content_delta(self, text: str) -> dict[str, Any]:
        self.content += text
        return {"content": text}


def _merge_content(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent content deltas as one."""
    out: list[dict[str, Any]] = []
    for delta in deltas:
        if out and "content" in delta and "content" in out[-1]:
            out[-1] = {"content": out[-1]["content"] + delta["content"]}
        else:
            out.append(delta)
    return out


# ---------------------------------------------------------------- registry

TOOL_PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesParser,
    "qwen": HermesParser,  # Qwen2.5 and Qwen3 write Hermes' format (SGLang's names)
    "qwen25": HermesParser,
    "llama3_json": Llama3JsonParser,
    "llama3": Llama3JsonParser,
    "mistral": MistralParser,
}


def make_tool_parser(name: str) -> ToolCallParser:
    """The parser `--tool-call-parser NAME` names; ValueError lists the names."""
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; use one of {', '.join(TOOL_PARSERS)}") from None


# What a chat template writes when it renders calls in a format, and what rules a format out:
# Qwen3-Coder and GLM-4.5 wrap XML calls, not JSON, in <tool_call>.
_TEMPLATE_SIGNS: dict[str, tuple[str, ...]] = {
    "hermes": ("<tool_call>",),
    "llama3_json": ("<|python_tag|>", '"parameters": dictionary of argument name'),
    "mistral": ("[TOOL_CALLS]",),
}
_TEMPLATE_VETOES: dict[str, tuple[str, ...]] = {"hermes": ("<function=", "<arg_key>", "<invoke ")}


def parser_for_template(chat_template: str | None) -> str | None:
    """The parser a chat template implies, when exactly one format's signs are in it."""
    if not chat_template:
        return None
    found = [name for name, signs in _TEMPLATE_SIGNS.items()
             if any(sign in chat_template for sign in signs)
             and not any(veto in chat_template for veto in _TEMPLATE_VETOES.get(name, ()))]
    return found[0] if len(found) == 1 else None
