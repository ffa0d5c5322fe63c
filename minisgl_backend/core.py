"""Request-level data: sampling parameters, requests, batches and the messages between processes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

import msgspec


_INT32_MAX = 2**31 - 1  # bounds every integer that becomes an engine tensor


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
    logprobs: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

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

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SamplingParams":
        """Parse user-supplied values (numbers may be strings); unknown keys raise ValueError."""
        known = set(cls.__struct_fields__)
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in known:
                raise ValueError(f"unknown sampling parameter {key!r}; known: {', '.join(sorted(known))}")
            kwargs[key] = _coerce(key, raw, _FIELD_KINDS[key])
        return cls(**kwargs)


_FIELD_KINDS = {
    "max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
    "seed": "optional_int", "stop": "str_list", "stop_token_ids": "int_list", "ignore_eos": bool,
    "min_tokens": int, "repetition_penalty": float, "presence_penalty": float,
    "frequency_penalty": float, "logprobs": bool,
}


def _coerce(key: str, raw: Any, kind: Any) -> Any:
    try:
        if kind == "optional_int":
            return None if raw is None or raw == "" else _to_int(raw)
        if kind == "str_list":
            if isinstance(raw, str):
                return [raw]
            if isinstance(raw, (list, tuple)) and all(isinstance(s, str) for s in raw):
                return list(raw)
            raise ValueError
        if kind == "int_list":
            if isinstance(raw, (list, tuple)):
                return [_to_int(x) for x in raw]
            return [_to_int(raw)]
        if kind is bool:
            return _to_bool(raw)
        if kind is int:
            return _to_int(raw)
        if isinstance(raw, bool):
            raise ValueError
        return float(raw)
    except (TypeError, ValueError):
        expected = {"optional_int": "an integer", "str_list": "a string or a list of strings",
                    "int_list": "a list of integers", bool: "a boolean", int: "an integer",
                    float: "a number"}[kind]
        raise ValueError(f"sampling parameter {key!r} must be {expected}, got {raw!r}") from None


def _to_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError
        return int(raw)
    if isinstance(raw, str):
        text = raw.strip()
        try:
            return int(text)
        except ValueError:
            as_float = float(text)
            if not as_float.is_integer():
                raise
            return int(as_float)
    if isinstance(raw, int):
        return raw
    raise ValueError


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false", "1", "0"):
        return raw.strip().lower() in ("true", "1")
    raise ValueError


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"sampling parameter {name!r} {rule}, got {value!r}")


# ---------------------------------------------------------------- messages between processes


class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class ErrorKind(str, Enum):
    INVALID = "invalid_request"  # the client must change the request
    OVERLOADED = "overloaded"  # retry later
    ENGINE = "engine_failure"  # the engine broke


class UserMsg(msgspec.Struct, tag=True):
    """A new request from the frontend to rank 0 (and from rank 0 to every other rank)."""

    rid: int
    input_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0


class AbortMsg(msgspec.Struct, tag=True):
    rid: int


class ShutdownMsg(msgspec.Struct, tag=True):
    pass


class FlushCacheMsg(msgspec.Struct, tag=True):
    pass


class TokenEvent(msgspec.Struct, tag=True):
    """Scheduler -> frontend: new ids for one request; `finish_reason` set on its last event."""

    rid: int
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    num_input_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    error_kind: str | None = None  # an ErrorKind value when `error` is set
    queue_time: float = 0.0


class StatsEvent(msgspec.Struct, tag=True):
    """Scheduler -> frontend: gauges of the running system."""

    running: int
    pending: int
    total_pages: int
    free_pages: int
    cached_pages: int
    locked_pages: int
    free_rows: int
    total_rows: int
    cache_hit_tokens: int
    cache_miss_tokens: int


class ErrorEvent(msgspec.Struct, tag=True):
    """Scheduler -> frontend: the engine failed and cannot serve anymore."""

    message: str


SchedulerInput = UserMsg | AbortMsg | ShutdownMsg | FlushCacheMsg
SchedulerOutput = TokenEvent | StatsEvent | ErrorEvent


# ---------------------------------------------------------------- scheduler-side request state


@dataclass(eq=False)
class Req:
    """One request inside the scheduler.

    Positions [0, cached_len) have K/V in the cache (or scheduled to); the token pool row holds
    ids for [0, device_len). After a batch that samples, cached_len == device_len - 1.
    """

    rid: int
    input_ids: list[int]
    params: SamplingParams
    seed: int
    max_output_tokens: int
    arrival_time: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    row: int = -1
    cached_len: int = 0
    device_len: int = 0
    pages: list[int] = field(default_factory=list)
    cache_node: Any = None  # locked radix node of the matched prefix
    matched_len: int = 0  # prefix tokens served from the radix cache at admission
    inflight: int = 0  # scheduled batches whose results are not processed yet
    finished: bool = False
    finish_sent: bool = False
    first_scheduled_time: float = 0.0

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def num_scheduled_outputs(self) -> int:
        return max(self.device_len - len(self.input_ids), 0)

    @property
    def wants_more(self) -> bool:
        """Whether another decode step may be scheduled (length limit not yet reached)."""
        return not self.finished and self.num_scheduled_outputs < self.max_output_tokens


@dataclass
class ScheduledReq:
    req: Req
    start: int  # first position computed in this batch
    end: int  # one past the last position computed
    samples: bool  # whether this batch samples the request's next token


@dataclass
class Batch:
    items: list[ScheduledReq]
    is_decode: bool

    @property
    def size(self) -> int:
        return len(self.items)

    @property
    def num_tokens(self) -> int:
        return sum(item.end - item.start for item in self.items)
