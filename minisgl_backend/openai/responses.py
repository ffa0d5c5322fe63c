"""OpenAI response bodies and stream chunks, built from Triton `Piece`s.

`ChoiceBuilder` accumulates one choice (text, token count, logprobs, finish reason) and turns
each piece into the endpoint's delta; `ChatShape` / `CompletionShape` say how each endpoint
spells a choice, its logprobs and its stream chunks (as dicts); `StreamEvents` encodes one
stream's chunks as server-sent events.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from minisgl_backend.openai.triton_client import Piece

TokenStrings = Callable[[str, int], list[str]]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class TokenLogprobs:
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class ChoiceBuilder:
    token_strings: TokenStrings
    want_logprobs: bool
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    logprobs: TokenLogprobs = field(default_factory=TokenLogprobs)
    texts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, piece: Piece) -> TokenLogprobs | None:
        """Take one piece; return its tokens' logprobs (None when not asked for)."""
        self.texts.append(piece.text)
        self.usage.completion_tokens += piece.num_output_tokens
        if piece.num_input_tokens is not None:
            self.usage.prompt_tokens = piece.num_input_tokens
        if piece.finish_reason:
            self.finish_reason = piece.finish_reason
        if not self.want_logprobs:
            return None
        tokens = piece.token_texts or self.token_strings(piece.text, len(piece.logprobs))
        new = TokenLogprobs(tokens, list(piece.logprobs))
        self.logprobs.tokens += new.tokens
        self.logprobs.logprobs += new.logprobs
        return new


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


class ChatShape(_Shape):
    object_name, chunk_object_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    @staticmethod
    def logprobs(lp: TokenLogprobs | None) -> dict | None:
        if lp is None:
            return None
        return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                            for t, v in zip(lp.tokens, lp.logprobs)]}

    def response(self, choice: ChoiceBuilder) -> dict:
        body = {"index": 0, "message": {"role": "assistant", "content": choice.text},
                "logprobs": self.logprobs(choice.logprobs if choice.want_logprobs else None),
                "finish_reason": choice.finish_reason}
        return self._envelope(self.object_name, [body], choice.usage, False)

    def chunk(self, delta: dict, lp: TokenLogprobs | None, finish_reason: str | None, usage_key: bool) -> dict:
        body = {"index": 0, "delta": delta, "logprobs": self.logprobs(lp), "finish_reason": finish_reason}
        return self._envelope(self.chunk_object_name, [body], None, usage_key)

    def first_chunk(self, usage_key: bool) -> dict | None:
        return self.chunk({"role": "assistant", "content": ""}, None, None, usage_key)

    def text_chunk(self, text: str, lp: TokenLogprobs | None, offset: int, usage_key: bool) -> dict:
        return self.chunk({"content": text}, lp, None, usage_key)

    def finish_chunk(self, finish_reason: str, usage_key: bool) -> dict:
        return self.chunk({}, None, finish_reason, usage_key)


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
        return {"tokens": lp.tokens, "token_logprobs": lp.logprobs, "top_logprobs": None, "text_offset": offsets}

    def response(self, choice: ChoiceBuilder) -> dict:
        body = {"index": 0, "text": choice.text,
                "logprobs": self.logprobs(choice.logprobs if choice.want_logprobs else None),
                "finish_reason": choice.finish_reason}
        return self._envelope(self.object_name, [body], choice.usage, False)

    def chunk(self, text: str, lp: TokenLogprobs | None, offset: int, finish_reason: str | None,
              usage_key: bool) -> dict:
        body = {"index": 0, "text": text, "logprobs": self.logprobs(lp, offset), "finish_reason": finish_reason}
        return self._envelope(self.chunk_object_name, [body], None, usage_key)

    def first_chunk(self, usage_key: bool) -> dict | None:
        return None

    def text_chunk(self, text: str, lp: TokenLogprobs | None, offset: int, usage_key: bool) -> dict:
        return self.chunk(text, lp, offset, None, usage_key)

    def finish_chunk(self, finish_reason: str, usage_key: bool) -> dict:
        return self.chunk("", None, 0, finish_reason, usage_key)


# ---------------------------------------------------------------- server-sent events

DONE = b"data: [DONE]\n\n"
_TEXT_HOLE = f"\ue000text-{uuid.uuid4().hex}\ue000"  # a placeholder no model name or id contains
_encode_string = msgspec.json.Encoder().encode  # the same bytes as json.dumps(s, ensure_ascii=False)


def sse_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class StreamEvents:
    """The SSE events of one stream, as bytes.

    A text chunk without logprobs differs from the stream's other text chunks only by its text,
    so it is the shape's own chunk encoded once with a placeholder, split around it, and filled
    per chunk with the JSON string of the text: the same bytes as `sse_event(text_chunk(...))`
    at a fraction of the cost, for the one event that is sent once per Triton response.
    """

    def __init__(self, shape: ChatShape | CompletionShape, include_usage: bool) -> None:
        self.shape = shape
        self.include_usage = include_usage
        template = sse_event(shape.text_chunk(_TEXT_HOLE, None, 0, include_usage))
        self._prefix, self._suffix = template.split(_encode_string(_TEXT_HOLE))

    def opening(self) -> bytes:
        first = self.shape.first_chunk(self.include_usage)
        return b"" if first is None else sse_event(first)

    def text(self, text: str, lp: TokenLogprobs | None, offset: int) -> bytes:
        if lp is None:
            return self._prefix + _encode_string(text) + self._suffix
        return sse_event(self.shape.text_chunk(text, lp, offset, self.include_usage))

    def closing(self, finish_reason: str, usage: Usage) -> bytes:
        """The finish chunk, the usage chunk when asked for, and [DONE]."""
        out = sse_event(self.shape.finish_chunk(finish_reason, self.include_usage))
        if self.include_usage:
            out += sse_event(self.shape.usage_chunk(usage))
        return out + DONE
