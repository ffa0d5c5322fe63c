"""Messages between the frontend and the scheduler processes, and their msgpack codecs.

frontend -> rank 0 -> ranks 1..N-1: `SchedulerInput` (UserMsg, AbortMsg, ShutdownMsg, FlushCacheMsg, DropLoraMsg)
rank 0 -> frontend: `SchedulerOutput` (TokenBatch, TokenEvent, StatsEvent, ErrorEvent), one list per step
every rank -> its parent, once at start-up: `ReadyMsg` (with `SchedulerInfo` when it started)
"""

from __future__ import annotations

from enum import Enum

import msgspec

from minisgl_backend.sampling_params import SamplingParams

class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class ErrorKind(str, Enum):
    INVALID = "invalid_request"  # the client must change the request
    OVERLOADED = "overloaded"  # retry later
    ENGINE = "engine_failure"  # the engine broke
    REQUEST = "request_failure"  # this request's own work failed in the engine; the others go on


class UserMsg(msgspec.Struct, tag=True):
    """A new request from the frontend to rank 0 (and from rank 0 to every other rank)."""

    rid: int
    input_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    lora_path: str | None = None  # the folder of `params.lora_name` (each rank loads it from there)


class DropLoraMsg(msgspec.Struct, tag=True):
    """An adapter was unloaded: its slot and its cached prefixes go (no request of it is running)."""

    lora_path: str


class AbortMsg(msgspec.Struct, tag=True):
    rid: int


class ShutdownMsg(msgspec.Struct, tag=True):
    pass


class FlushCacheMsg(msgspec.Struct, tag=True):
    pass


class TopLogprobs(msgspec.Struct, array_like=True):
    """At one position: the chosen token's rank among the whole vocabulary (1: the most likely)
    and the most likely tokens with their logprobs, best first."""

    rank: int
    ids: list[int]
    logprobs: list[float]


class TokenBatch(msgspec.Struct, tag=True):
    """Scheduler -> frontend: every id one step sampled, `tokens[i]` for request `rids[i]`
    (one message per step, no object per token)."""

    rids: list[int]
    tokens: list[int]
    logprobs: list[float] | None = None  # aligned with tokens; NaN for requests that did not ask
    top: list[TopLogprobs | None] | None = None  # aligned with tokens, for requests that asked logprobs


class TokenEvent(msgspec.Struct, tag=True):
    """Scheduler -> frontend: what is not a plain token of one request: its start (first token:
    `num_input_tokens`, `cached_tokens`, `queue_time`) or its end (`finish_reason`, errors).
    `token_ids` is empty in the scheduler's events (tokens travel in TokenBatch)."""

    rid: int
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[float] | None = None
    num_input_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None  # set with `error`
    queue_time: float = 0.0
    # in a request's start event, when it asked `prompt_logprobs`: one entry per prompt token after the first
    prompt_logprobs: list[float] | None = None
    prompt_top: list[TopLogprobs] | None = None


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
    # speculative decoding, cumulative: requests verified (one per request and step), drafted ids,
    # drafted ids the model agreed with
    spec_verify_rows: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    # LoRA: adapters in device slots now; loads into a slot and evictions from one, cumulative
    lora_resident: int = 0
    lora_loads: int = 0
    lora_evictions: int = 0
    lora_requests: dict[str, tuple[int, int]] = {}  # adapter folder -> (running, waiting) requests of it


class ErrorEvent(msgspec.Struct, tag=True):
    """Scheduler -> frontend: the engine failed and cannot serve anymore."""

    message: str


SchedulerInput = UserMsg | AbortMsg | ShutdownMsg | FlushCacheMsg | DropLoraMsg
SchedulerOutput = TokenBatch | TokenEvent | StatsEvent | ErrorEvent


class SchedulerInfo(msgspec.Struct):
    """What a started scheduler tells its parent about the engine it runs."""

    context_len: int
    vocab_size: int
    num_pages: int
    page_size: int


class ReadyMsg(msgspec.Struct):
    """A scheduler process -> its parent, once: started (with `info`) or failed (with `error`)."""

    rank: int
    info: SchedulerInfo | None = None
    error: str | None = None


_ENCODER = msgspec.msgpack.Encoder()
_INPUT_DECODER = msgspec.msgpack.Decoder(list[SchedulerInput])
_OUTPUT_DECODER = msgspec.msgpack.Decoder(list[SchedulerOutput])
_READY_DECODER = msgspec.msgpack.Decoder(ReadyMsg)


def encode(msgs: object) -> bytes:
    return _ENCODER.encode(msgs)


def decode_inputs(data: bytes) -> list[SchedulerInput]:
    return _INPUT_DECODER.decode(data)


def decode_outputs(data: bytes) -> list[SchedulerOutput]:
    return _OUTPUT_DECODER.decode(data)


def decode_ready(data: bytes) -> ReadyMsg:
    return _READY_DECODER.decode(data)
