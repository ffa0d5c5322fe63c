"""Request bodies of /v1/chat/completions and /v1/completions (pydantic).

As vLLM's server does, fields this server does not know are ignored, and each request that had
some names them in a log line (`ignored_fields`). Fields that exist in OpenAI's API, vLLM's or
SGLang's (the SGLang Model Gateway re-sends every request with SGLang's extras) are declared:
those that ask for something this server does not do (`no_stop_trim`, `return_hidden_states`,
...) are accepted at their neutral values and refused with a 400 naming them otherwise
(`unsupported`). Values are checked by the engine (its INVALID_ARG message is passed through as
a 400). Every string must be valid Unicode (a lone surrogate escape is a 400 naming its field).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from minisgl_backend.openai.errors import OpenAIError, invalid

MAX_CHOICES = 128  # n, and prompts x n of one request
MAX_TOP_LOGPROBS = 20


def _encodable(value: Any) -> Any:
    """Strings, in any nesting, must encode as UTF-8 (a JSON "\\ud800" escape decodes to a lone
    surrogate, which the tokenizer and the wire could not carry)."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"holds a lone UTF-16 surrogate ({ascii(item[exc.start])} at character "
                                 f"{exc.start}), which is not valid Unicode text") from None
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return value


class _Lenient(BaseModel):
    """Unknown fields are kept aside (`model_extra`), not refused: see `ignored_fields`."""

    model_config = ConfigDict(extra="allow")

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        return _encodable(value)

    def ignored_fields(self, prefix: str = "") -> list[str]:
        """The dotted names of the fields this request sent that no model declares."""
        names = [f"{prefix}{name}" for name in (self.model_extra or {})]
        for name in type(self).model_fields:
            value = getattr(self, name)
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, _Lenient):
                    where = f"{prefix}{name}.{i}." if isinstance(value, list) else f"{prefix}{name}."
                    names += item.ignored_fields(where)
        return names


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, `usage` on every chunk
    include_obfuscation: bool | None = None  # padding against side channels: not needed, ignored


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # as vLLM joins text parts


class _Sampling(_Strict):
    """Fields both endpoints share; the extras are those vLLM and SGLang accept."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM / SGLang extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    structured_outputs: dict[str, Any] | str | None = None  # vLLM's: json / json_object / regex / choice / grammar
    # vLLM's older structured-output keys (the engine takes them as they are)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # accepted at their neutral values only (`_NEUTRAL`); SGLang's, as the SGLang Model Gateway
    # re-sends every request with them, and vLLM's
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    separate_reasoning: bool = True  # no reasoning parser: nothing to separate either way
    stream_reasoning: bool = True  # no reasoning parser: nothing to hold back either way
    return_hidden_states: bool = False
    include_stop_str_in_output: bool = False
    use_beam_search: bool = False
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool = False

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage_in_stream(self) -> bool:
        """vLLM's `stream_options.continuous_usage_stats` (with `include_usage`): usage on every chunk."""
        return self.include_usage_in_stream and self.stream_options.continuous_usage_stats

    def sampling_parameters(self, max_tokens: int, lora_name: str | None = None) -> dict[str, Any]:
        """The `sampling_parameters` JSON of the vLLM-backend contract: only what the client set."""
        out: dict[str, Any] = {"max_tokens": max_tokens}
        for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                    "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if stop:
            out["stop"] = stop
        constraint = self.constraint()
        if constraint is not None:
            out["structured_outputs"] = constraint
        return out

    def constraint(self) -> dict[str, Any] | str | None:
        """The `structured_outputs` the engine gets (the engine validates and compiles it)."""
        return self.structured_outputs

    def _common_unsupported(self) -> OpenAIError | None:
        if self.n is not None and self.n != 1:
            return invalid(f"n={self.n} is not supported: this server returns one choice per request (n=1)", "n")
        if self.logit_bias:
            return invalid("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            return invalid("stream_options is only allowed with stream=true", "stream_options")
        return None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def constraint(self) -> dict[str, Any] | str | None:
        """`response_format` as the engine's `structured_outputs` (json_object / json_schema)."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_object":
            return {"json_object": True}
        if kind == "json_schema":
            spec = self.response_format.get("json_schema") or {}
            return {"json": spec.get("schema", {"type": "object"})}
        return self.structured_outputs

    def unsupported(self) -> OpenAIError | None:
        if (common := self._common_unsupported()) is not None:
            return common
        if self.tools or self.functions:
            field = "tools" if self.tools else "functions"
            return invalid(f"{field} (function calling) is not supported by this server", field)
        for field in ("tool_choice", "function_call"):
            if getattr(self, field) not in (None, "none", "auto"):
                return invalid(f"{field} is not supported by this server (no tools)", field)
        if self.top_logprobs:
            return invalid("top_logprobs > 0 is not supported: only the sampled tokens' logprobs are available "
                           "(logprobs=true, top_logprobs=0)", "top_logprobs")
        return self._response_format_error()

    def _response_format_error(self) -> OpenAIError | None:
        if self.response_format is None:
            return None
        kind = self.response_format.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            return invalid(f"response_format type {kind!r} is not supported; use text, json_object or json_schema",
                           "response_format")
        if kind == "json_schema":
            spec = self.response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                return invalid("response_format json_schema must be an object with a 'schema' object",
                               "response_format")
        if kind != "text" and self.structured_outputs is not None:
            return invalid("send either response_format or structured_outputs, not both", "response_format")
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request: a string or token ids."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise invalid(f"prompt holds {len(prompt)} prompts; send one prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt == "":
            raise invalid("prompt is empty: send at least one character", "prompt")
        if isinstance(prompt, list) and not prompt:
            raise invalid("prompt is empty: send at least one token id", "prompt")
        return prompt

    def unsupported(self) -> OpenAIError | None:
        if (common := self._common_unsupported()) is not None:
            return common
        if self.best_of is not None and self.best_of != 1:
            return invalid(f"best_of={self.best_of} is not supported (only 1)", "best_of")
        if self.echo:
            return invalid("echo=true is not supported", "echo")
        if self.suffix:
            return invalid("suffix is not supported", "suffix")
        if self.logprobs is not None and self.logprobs != 0:
            return invalid(f"logprobs={self.logprobs} is not supported: top alternatives are not available; "
                           "logprobs=0 returns the sampled tokens' logprobs", "logprobs")
        return None
