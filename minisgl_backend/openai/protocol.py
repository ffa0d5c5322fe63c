"""Request bodies of /v1/chat/completions and /v1/completions (pydantic).

Every field is declared; anything else is refused with a 400 that names it (`extra="forbid"`).
Fields that exist in OpenAI's API but ask for something this server does not do (`n > 1`,
`tools`, `top_logprobs > 0`, `echo`, ...) are declared so that `unsupported_fields` can name them.
Values are checked by the engine (its INVALID_ARG message is passed through as a 400).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from minisgl_backend.openai.errors import OpenAIError, invalid


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
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

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_parameters(self, max_tokens: int) -> dict[str, Any]:
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
