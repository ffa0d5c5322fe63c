"""SamplingParams: what a request asks of the sampler, validated once, with user-facing errors."""

from __future__ import annotations

import math
from typing import Any, Mapping

import msgspec

from minisgl_backend.coerce import COERCERS, to_int
from minisgl_backend.structured_outputs import LEGACY_KEYS, StructuredOutputs, from_legacy_keys, parse_structured_outputs


_INT32_MAX = 2**31 - 1  # bounds every integer that becomes an engine tensor
MAX_TOP_LOGPROBS = 20  # alternatives per position, as OpenAI allows
MAX_LOGIT_BIAS = 100.0


class SamplingParams(msgspec.Struct, kw_only=True):
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1  # -1 or 0: whole vocabulary
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False  # the sampled tokens' logprobs
    top_logprobs: int = 0  # with logprobs: this many most likely tokens per position, and the chosen one's rank
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs (and this many alternatives each)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    lora_name: str | None = None  # the LoRA adapter that serves this request (None: the base model)
    structured_outputs: StructuredOutputs | None = None  # given as an object / JSON text, kept normalised

    def __post_init__(self) -> None:
        if self.structured_outputs is not None:
            self.structured_outputs = _structured(self.structured_outputs)
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def argmax_only(self) -> bool:
        """Greedy without penalties or logprobs: the row's argmax is the next id (once
        `min_tokens` no longer suppresses EOS / stop ids)."""
        return (self.is_greedy and self.repetition_penalty == 1.0 and self.presence_penalty == 0.0
                and self.frequency_penalty == 0.0 and not self.logprobs and not self.logit_bias)

    def validate(self) -> None:
        _check(1 <= self.max_tokens <= _INT32_MAX, "max_tokens", f"must be in [1, {_INT32_MAX}]", self.max_tokens)
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0", self.temperature)
        _check(self.top_k == -1 or 0 <= self.top_k <= _INT32_MAX, "top_k",
               f"must be -1 (off) or in [0, {_INT32_MAX}]", self.top_k)
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        _check(self.seed is None or 0 <= self.seed < 2**63, "seed", "must be in [0, 2^63)", self.seed)
        _check(self.min_tokens >= 0, "min_tokens", "must be >= 0", self.min_tokens)
        _check(self.min_tokens <= self.max_tokens, "min_tokens", "must be <= max_tokens", self.min_tokens)
        _check(_finite(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", "must be > 0", self.repetition_penalty)
        _check(_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
               "presence_penalty", "must be in [-2, 2]", self.presence_penalty)
        _check(_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
               "frequency_penalty", "must be in [-2, 2]", self.frequency_penalty)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings", self.stop)
        _check(all(isinstance(t, int) and 0 <= t <= _INT32_MAX for t in self.stop_token_ids),
               "stop_token_ids", f"must be token ids in [0, {_INT32_MAX}]", self.stop_token_ids)
        _check(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]",
               self.top_logprobs)
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS, "prompt_logprobs",
               f"must be in [0, {MAX_TOP_LOGPROBS}] (or null: none)", self.prompt_logprobs)
        for token, bias in (self.logit_bias or {}).items():
            _check(isinstance(token, int) and 0 <= token <= _INT32_MAX, "logit_bias",
                   f"keys must be token ids in [0, {_INT32_MAX}]", token)
            _check(_finite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS, "logit_bias",
                   f"values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] (token {token})", bias)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SamplingParams":
        """Parse user-supplied values (numbers may be strings); unknown keys raise ValueError."""
        known = set(cls.__struct_fields__)
        kwargs: dict[str, Any] = {}
        legacy = _legacy_constraint(values)
        if legacy is not None:
            kwargs["structured_outputs"] = legacy
        for key, raw in values.items():
            if key in LEGACY_KEYS:
                continue
            if key not in known:
                raise ValueError(f"unknown sampling parameter {key!r}; known: {', '.join(sorted(known))}")
            kwargs[key] = _coerce(key, raw, _FIELD_KINDS[key])
        return cls(**kwargs)


_FIELD_KINDS = {
    "max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
    "seed": "optional_int", "stop": "str_list", "stop_token_ids": "int_list", "ignore_eos": bool,
    "min_tokens": int, "repetition_penalty": float, "presence_penalty": float,
    "frequency_penalty": float, "logprobs": bool, "top_logprobs": int, "prompt_logprobs": "optional_int",
    "logit_bias": "bias_map", "lora_name": "optional_str", "structured_outputs": "structured",
}


def _structured(raw: Any) -> StructuredOutputs:
    try:
        return parse_structured_outputs(raw)
    except ValueError as exc:
        raise ValueError(f"sampling parameter {exc}") from None


def _legacy_constraint(values: Mapping[str, Any]) -> StructuredOutputs | None:
    """The `guided_*` keys; together with `structured_outputs` they would be two constraints."""
    try:
        legacy = from_legacy_keys(values)
    except ValueError as exc:
        raise ValueError(f"sampling parameter {exc}") from None
    if legacy is not None and values.get("structured_outputs") is not None:
        key = next(k for k in values if k in LEGACY_KEYS)
        raise ValueError(f"sampling parameters 'structured_outputs' and {key!r} were both given: "
                         "a request takes one constraint")
    return legacy


def _coerce(key: str, raw: Any, kind: Any) -> Any:
    if kind == "structured":
        return None if raw is None else _structured(raw)
    try:
        if kind == "optional_int":
            return None if raw is None or raw == "" else to_int(raw)
        if kind == "optional_str":
            if raw is None or isinstance(raw, str):
                return raw or None
            raise ValueError
        if kind == "str_list":
            if isinstance(raw, str):
                return [raw]
            if isinstance(raw, (list, tuple)) and all(isinstance(s, str) for s in raw):
                return list(raw)
            raise ValueError
        if kind == "int_list":
            if isinstance(raw, (list, tuple)):
                return [to_int(x) for x in raw]
            return [to_int(raw)]
        if kind == "bias_map":
            if raw is None:
                return None
            if not isinstance(raw, Mapping):
                raise ValueError
            return {to_int(token): COERCERS[float](bias) for token, bias in raw.items()}
        return COERCERS[kind](raw)
    except ValueError:
        expected = {"optional_int": "an integer", "str_list": "a string or a list of strings",
                    "int_list": "a list of integers", bool: "a boolean", int: "an integer",
                    float: "a number", "bias_map": "an object of token id -> bias",
                    "optional_str": "a string"}[kind]
        raise ValueError(f"sampling parameter {key!r} must be {expected}, got {raw!r}") from None


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"sampling parameter {name!r} {rule}, got {value!r}")
