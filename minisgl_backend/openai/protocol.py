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

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallItem(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # as vLLM joins text parts

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it (arguments as objects, as transformers documents)."""
        turn: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            turn["tool_calls"] = [{"id": call.id, "type": "function",
                                   "function": {"name": call.function.name,
                                                "arguments": _as_object(call.function.arguments)}}
                                  for call in self.tool_calls]
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            turn["name"] = self.name
        return turn


def _as_object(arguments: str | dict[str, Any]) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class _Sampling(_Lenient):
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
        if lora_name is not None:
            out["lora_name"] = lora_name
        for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                    "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "logit_bias", *_GUIDED):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        top = self.top_logprobs_count()
        if top is not None:
            out["logprobs"] = top  # vLLM's count: each token's logprob, rank and this many alternatives
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

    def top_logprobs_count(self) -> int | None:
        """Alternatives per token when logprobs are asked for (None: no logprobs)."""
        raise NotImplementedError

    @property
    def num_choices(self) -> int:
        return self.n if self.n is not None else 1

    def _common_unsupported(self) -> OpenAIError | None:
        for name, (neutral, why) in _NEUTRAL.items():
            value = getattr(self, name, None)
            if value not in neutral:
                return invalid(f"{name}={json.dumps(value)} is not supported: {why}", name)
        guided = [key for key in _GUIDED if getattr(self, key) is not None]
        if guided and self.constraint() is not None:
            return invalid(f"send one constraint: {guided[0]} or structured_outputs / response_format, not both",
                           guided[0])
        if not 1 <= self.num_choices <= MAX_CHOICES:
            return invalid(f"n must be in [1, {MAX_CHOICES}], got {self.n}", "n")
        for token, bias in (self.logit_bias or {}).items():
            if not token.strip().isdigit():
                return invalid(f"logit_bias keys must be token ids (as strings), got {token!r}", "logit_bias")
            if not -100 <= bias <= 100:
                return invalid(f"logit_bias values must be in [-100, 100], got {bias} for token {token}", "logit_bias")
        if self.stream_options is not None and not self.stream:
            return invalid("stream_options is only allowed with stream=true", "stream_options")
        return None


_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")

# field -> (the values it may take here, why others are refused)
_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "no_stop_trim": ((False,), "the text always ends before the stop string"),
    "skip_special_tokens": ((True,), "special tokens are always left out of the text"),
    "spaces_between_special_tokens": ((True,), "special tokens are always left out of the text"),
    "include_stop_str_in_output": ((False,), "the text always ends before the stop string"),
    "return_hidden_states": ((False,), "hidden states are not returned by this server"),
    "use_beam_search": ((False,), "beam search is not implemented"),
    "prompt_logprobs": ((None,), "use /v1/completions with echo=true and logprobs for the prompt's logprobs"),
    "return_tokens_as_token_ids": ((False,), "tokens are returned as text"),
}


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
    # vLLM / SGLang chat-template switches
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # render the last message open, to be continued
    echo: bool = False  # vLLM's chat echo (neutral only)

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

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
        if self.echo:
            return invalid("echo=true is not supported for chat; /v1/completions echoes the prompt", "echo")
        if self.functions or self.function_call not in (None, "none", "auto"):
            field = "functions" if self.functions else "function_call"
            return invalid(f"{field} (the deprecated form of tools) is not supported: send tools / tool_choice", field)
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            return invalid(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}", "top_logprobs")
        if self.top_logprobs and not self.logprobs:
            return invalid("top_logprobs needs logprobs=true", "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
            return invalid("continue_final_message=true continues the last message, so it cannot take "
                           "add_generation_prompt=true", "continue_final_message")
        return self._response_format_error()

    def template_switches(self) -> dict[str, bool]:
        """`apply_chat_template`'s switches: continuing the final message (SGLang sends no
        add_generation_prompt, so its default gives way) or opening the assistant's turn."""
        if self.continue_final_message:
            return {"add_generation_prompt": False, "continue_final_message": True}
        return {"add_generation_prompt": self.add_generation_prompt, "continue_final_message": False}

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

    def has_own_constraint(self) -> bool:
        """response_format / structured_outputs / guided_*: what a forced tool call cannot combine with."""
        return self.constraint() is not None or any(getattr(self, key) is not None for key in _GUIDED)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False  # the prompt before the completion (with its tokens' logprobs when logprobs is set)
    suffix: str | None = None
    best_of: int | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, each a string or token ids (OpenAI's batched form: a list of them)."""
        prompt = self.prompt
        batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
        for i, one in enumerate(batch):
            where = "prompt" if len(batch) == 1 else f"prompt.{i}"
            if isinstance(one, str) and one == "":
                raise invalid(f"{where} is empty: send at least one character", where)
            if isinstance(one, list) and not one:
                raise invalid(f"{where} is empty: send at least one token id", where)
        if len(batch) * self.num_choices > MAX_CHOICES:
            raise invalid(f"{len(batch)} prompts x n={self.num_choices} is more than {MAX_CHOICES} choices", "prompt")
        return batch

    def unsupported(self) -> OpenAIError | None:
        if (common := self._common_unsupported()) is not None:
            return common
        if self.best_of is not None and self.best_of != self.num_choices:
            return invalid(f"best_of={self.best_of} is not supported (only best_of = n)", "best_of")
        if self.suffix:
            return invalid("suffix is not supported", "suffix")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            return invalid(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}", "logprobs")
        if self.max_tokens == 0 and not self.echo:
            return invalid("max_tokens=0 generates nothing: it is only allowed with echo=true", "max_tokens")
        return None
