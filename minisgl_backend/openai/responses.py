"""OpenAI response bodies and stream chunks, built from Triton `Piece`s.

`ChoiceBuilder` accumulates one choice (text, token count, logprobs with their alternatives, the
echoed prompt, tool calls, finish reason) and turns each piece into the endpoint's delta;
`ChatShape` / `CompletionShape` say how each endpoint spells a choice, its logprobs and its
stream chunks (as dicts); `StreamEvents` encodes one response's chunks as server-sent events.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from minisgl_backend.openai.tool_parsers import ToolCallParser, ToolCallStream
from minisgl_backend.openai.triton_client import Alternative, Piece

TokenStrings = Callable[[str, int], list[str]]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    @classmethod
    def total(cls, choices: list["ChoiceBuilder"]) -> "Usage":
        """Each prompt counted once (its n choices share it), every choice's completion."""
        prompts = {c.prompt_index: c.usage.prompt_tokens for c in choices}
        return cls(sum(prompts.values()), sum(c.usage.completion_tokens for c in choices))


@dataclass
class TokenLogprobs:
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[str, float]] | None] | None = None  # per token, when alternatives were asked

    def extend(self, other: "TokenLogprobs") -> None:
        self.tokens += other.tokens
        self.logprobs += other.logprobs
        if other.top is not None:
            self.top = (self.top or []) + other.top


@dataclass
class Echo:
    """The prompt before a completion's text: its text and, with logprobs, its tokens' (the first None)."""

    text: str
    first_token: str = ""


@dataclass
class ChoiceBuilder:
    token_strings: TokenStrings
    want_logprobs: bool
    index: int = 0
    prompt_index: int = 0
    top_k: int = 0  # alternatives per token (chat top_logprobs, completions logprobs)
    echo: Echo | None = None
    drop_generated: bool = False  # max_tokens 0 with echo: the one token asked of the engine is not shown
    tool_parser: ToolCallParser | None = None
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    logprobs: TokenLogprobs = field(default_factory=TokenLogprobs)
    texts: list[str] = field(default_factory=list)
    tool_stream: ToolCallStream | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, piece: Piece) -> TokenLogprobs | None:
        """Take one piece; return its tokens' logprobs, the echoed prompt's first (None when not asked for)."""
        if piece.num_input_tokens is not None:
            self.usage.prompt_tokens = piece.num_input_tokens
        if piece.finish_reason:
            self.finish_reason = "length" if self.drop_generated else piece.finish_reason
        new = self._prompt_logprobs(piece) if self.want_logprobs and self.echo is not None else None
        if not self.drop_generated:
            self.texts.append(piece.text)
            self.usage.completion_tokens += piece.num_output_tokens
            if self.want_logprobs:
                own = self._token_logprobs(piece)
                if new is None:
                    new = own
                else:
                    new.extend(own)
        if new is not None:
            self.logprobs.extend(new)
        return new

    def piece_text(self, piece: Piece, first: bool) -> str:
        """The text a piece adds to the choice (the echoed prompt before the first)."""
        text = "" if self.drop_generated else piece.text
        return self.echo.text + text if first and self.echo is not None else text

    def _token_logprobs(self, piece: Piece) -> TokenLogprobs:
        tokens = piece.token_texts
        if tokens is None or "".join(tokens) != piece.text:  # a character cut between tokens: re-tokenize
            tokens = self.token_strings(piece.text, len(piece.logprobs))
        top = [self._top(named) for named in piece.alternatives] if piece.alternatives is not None else None
        return TokenLogprobs(tokens, list(piece.logprobs), top if self.top_k or top is not None else None)

    def _prompt_logprobs(self, piece: Piece) -> TokenLogprobs | None:
        if piece.prompt_logprobs is None:
            return None
        out = TokenLogprobs([self.echo.first_token], [None], [None])
        for named in piece.prompt_logprobs[1:]:
            out.tokens.append(named[0][0] if named else "")
            out.logprobs.append(named[0][1] if named else None)
            out.top.append(self._top(named) if named else None)
        return out

    def _top(self, named: list[Alternative]) -> list[tuple[str, float]]:
        """The k most likely of the tokens a position names (ranked; the chosen token only if among them)."""
        ranked = sorted((rank, text, logprob) for text, logprob, rank in named if rank is not None)
        return [(text, logprob) for _, text, logprob in ranked[:self.top_k]]

    def tool_calls(self) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of the whole text: parsed when tools are in play."""
        if self.tool_parser is None:
            return self.text, []
        content, calls = self.tool_parser.parse(self.text)
        return content, [call.as_openai() for call in calls]

    def final_reason(self, has_calls: bool) -> str:
        """`tool_calls` when the answer ended with calls (a cut one stays `length`)."""
        reason = self.finish_reason or "stop"
        return "tool_calls" if has_calls and reason == "stop" else reason


class _Shape:
    object_name: str
    chunk_object_name: str
    id_prefix: str

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict], usage: Usage | None, with_usage_key: bool) -> dict:
        body: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                "choices": choices}
        if usage is not None:
            body["usage"] = usage.as_dict()
        elif with_usage_key:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: Usage) -> dict:
        return self._envelope(self.chunk_object_name, [], usage, True)

    def response(self, choices: list[ChoiceBuilder]) -> dict:
        return self._envelope(self.object_name, [self.choice(c) for c in choices], Usage.total(choices), False)

    def choice(self, choice: ChoiceBuilder) -> dict:
        raise NotImplementedError


class ChatShape(_Shape):
    object_name, chunk_object_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    @staticmethod
    def logprobs(lp: TokenLogprobs | None) -> dict | None:
        if lp is None:
            return None
        tops = lp.top or [None] * len(lp.tokens)
        return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8")),
                             "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode("utf-8"))}
                                              for a, b in top or ()]}
                            for t, v, top in zip(lp.tokens, lp.logprobs, tops)]}

    def choice(self, choice: ChoiceBuilder) -> dict:
        content, calls = choice.tool_calls()
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return {"index": choice.index, "message": message,
                "logprobs": self.logprobs(choice.logprobs if choice.want_logprobs else None),
                "finish_reason": choice.final_reason(bool(calls))}

    def chunk(self, delta: dict, lp: TokenLogprobs | None, finish_reason: str | None, usage_key: bool,
              index: int = 0) -> dict:
        body = {"index": index, "delta": delta, "logprobs": self.logprobs(lp), "finish_reason": finish_reason}
        return self._envelope(self.chunk_object_name, [body], None, usage_key)

    def first_chunk(self, usage_key: bool, index: int = 0) -> dict | None:
        return self.chunk({"role": "assistant", "content": ""}, None, None, usage_key, index)

    def text_chunk(self, text: str, lp: TokenLogprobs | None, offset: int, usage_key: bool, index: int = 0) -> dict:
        return self.chunk({"content": text}, lp, None, usage_key, index)

    def finish_chunk(self, finish_reason: str, usage_key: bool, index: int = 0) -> dict:
        return self.chunk({}, None, finish_reason, usage_key, index)


class CompletionShape(_Shape):
    object_name, chunk_object_name, id_prefix = "text_completion", "text_completion", "cmpl"

    @staticmethod
    def logprobs(lp: TokenLogprobs | None, offset: int = 0) -> dict | None:
        if lp is None:
            return None
        offsets = []
        for token in lp.tokens:
            offsets.append(offset)
            offset += len(token)
        top = None if lp.top is None else [None if t is None else _by_text(t) for t in lp.top]
        return {"tokens": lp.tokens, "token_logprobs": lp.logprobs, "top_logprobs": top, "text_offset": offsets}

    def choice(self, choice: ChoiceBuilder) -> dict:
        text = (choice.echo.text if choice.echo is not None else "") + choice.text
        return {"index": choice.index, "text": text,
                "logprobs": self.logprobs(choice.logprobs if choice.want_logprobs else None),
                "finish_reason": choice.finish_reason or "stop"}

    def chunk(self, text: str, lp: TokenLogprobs | None, offset: int, finish_reason: str | None,
              usage_key: bool, index: int = 0) -> dict:
        body = {"index": index, "text": text, "logprobs": self.logprobs(lp, offset), "finish_reason": finish_reason}
        return self._envelope(self.chunk_object_name, [body], None, usage_key)

    def first_chunk(self, usage_key: bool, index: int = 0) -> dict | None:
        return None

    def text_chunk(self, text: str, lp: TokenLogprobs | None, offset: int, usage_key: bool, index: int = 0) -> dict:
        return self.chunk(text, lp, offset, None, usage_key, index)

    def finish_chunk(self, finish_reason: str, usage_key: bool, index: int = 0) -> dict:
        return self.chunk("", None, 0, finish_reason, usage_key, index)


def _by_text(top: list[tuple[str, float]]) -> dict[str, float]:
    """{token text: logprob}, best first; tokens of one text (bytes of one character) keep the best's."""
    out: dict[str, float] = {}
    for text, logprob in top:
        out.setdefault(text, logprob)
    return out


# ---------------------------------------------------------------- server-sent events

DONE = b"data: [DONE]\n\n"
_TEXT_HOLE = f"\ue000text-{uuid.uuid4().hex}\ue000"  # a placeholder no model name or id contains
_encode_string = msgspec.json.Encoder().encode  # the same bytes as json.dumps(s, ensure_ascii=False)


def sse_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class StreamEvents:
    """The SSE events of one streamed response, as bytes.

    A text chunk without logprobs differs from the stream's other text chunks of its choice only
    by its text, so it is the shape's own chunk encoded once per choice with a placeholder, split
    around it, and filled per chunk with the JSON string of the text: the same bytes as
    `sse_event(text_chunk(...))` at a fraction of the cost, for the one event that is sent once
    per Triton response. With `continuous_usage` (vLLM's `stream_options.continuous_usage_stats`)
    every chunk carries the usage so far instead of `"usage": null`.
    """

    def __init__(self, shape: ChatShape | CompletionShape, include_usage: bool,
                 continuous_usage: bool = False) -> None:
        self.shape = shape
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        self._templates: dict[int, tuple[bytes, bytes]] = {}

    def opening(self, usage: Usage | None = None, index: int = 0) -> bytes:
        first = self.shape.first_chunk(self.include_usage, index)
        if first is None:
            return b""
        return self._event(first, Usage(usage.prompt_tokens, 0) if usage is not None else None)

    def text(self, text: str, lp: TokenLogprobs | None, offset: int, usage: Usage | None = None,
             index: int = 0) -> bytes:
        if lp is None and not self.continuous_usage:
            prefix, suffix = self._template(index)
            return prefix + _encode_string(text) + suffix
        return self._event(self.shape.text_chunk(text, lp, offset, self.include_usage, index), usage)

    def delta(self, delta: dict, lp: TokenLogprobs | None, usage: Usage | None = None, index: int = 0) -> bytes:
        """A chat delta of its own shape (tool calls)."""
        return self._event(self.shape.chunk(delta, lp, None, self.include_usage, index), usage)

    def finish(self, finish_reason: str, usage: Usage | None = None, index: int = 0) -> bytes:
        return self._event(self.shape.finish_chunk(finish_reason, self.include_usage, index), usage)

    def closing(self, finish_reason: str, usage: Usage) -> bytes:
        """The finish chunk of a single choice, the usage chunk when asked for, and [DONE]."""
        return self.finish(finish_reason, usage) + self.ending(usage)

    def ending(self, usage: Usage) -> bytes:
        """The usage chunk when asked for, and [DONE]."""
        return (sse_event(self.shape.usage_chunk(usage)) if self.include_usage else b"") + DONE

    def _template(self, index: int) -> tuple[bytes, bytes]:
        template = self._templates.get(index)
        if template is None:
            event = sse_event(self.shape.text_chunk(_TEXT_HOLE, None, 0, self.include_usage, index))
            template = self._templates[index] = tuple(event.split(_encode_string(_TEXT_HOLE)))
        return template

    def _event(self, chunk: dict, usage: Usage | None) -> bytes:
        if self.continuous_usage and usage is not None:
            chunk["usage"] = usage.as_dict()
        return sse_event(chunk)
