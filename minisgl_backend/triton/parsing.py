"""Turning one Triton request into (prompt, SamplingParams, options), with actionable errors.

Pure Python + numpy: no `triton_python_backend_utils` here, so it is unit-tested without a
server. The adapter hands in a getter for input tensors (already numpy arrays) and the
request's parameters JSON; anything wrong raises `RequestError`, which the adapter answers
with one `TritonError(INVALID_ARG)` response.

Sampling settings may come from three places, later ones overriding earlier ones:
flat tensors (``max_tokens`` INT32 ...), Triton request parameters
(``{"parameters": {"max_tokens": 16}}`` on /generate), and the ``sampling_parameters`` JSON
string tensor of the vLLM backend (the JSON ones are read in parameters.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from minisgl_backend.sampling_params import SamplingParams
from minisgl_backend.triton.contract import BOOL_INPUTS, FLAT_SAMPLING_INPUTS
from minisgl_backend.triton.parameters import (RequestError, as_bool, drop_neutral_vllm_keys, logprobs_count,
                                               request_parameters, require_encodable, sampling_parameters_json)

__all__ = ["InputGetter", "ParsedRequest", "RequestError", "parse_request"]


@dataclass
class ParsedRequest:
    prompt: str | list[int]  # text, or token ids when input_ids was sent
    params: SamplingParams
    stream: bool = False
    exclude_input_in_output: bool = False
    return_finish_reason: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    return_logprobs: bool = False
    prompt_text: str | None = None  # the text prompt, for echoing it in non-streaming output
    # `logprobs` asked as a count in the sampling parameters (Triton's vLLM backend): each token's
    # logprobs as {token id: {logprob, rank, decoded_token}} instead of one float
    vllm_logprobs: bool = False


InputGetter = Callable[[str], "np.ndarray | None"]


def parse_request(get_input: InputGetter, parameters_json: str | bytes | None = None,
                  vocab_size: int | None = None) -> ParsedRequest:
    """Parse one request. `get_input(name)` returns the input tensor as numpy, or None if absent."""
    flags = {name: _bool_input(get_input, name) for name in BOOL_INPUTS}
    sampling: dict[str, Any] = {}

    for name, (_, key) in FLAT_SAMPLING_INPUTS.items():
        value = _flat_sampling_input(get_input, name)
        if value is not None:
            sampling[key] = value

    for key, value in request_parameters(parameters_json).items():
        if key in BOOL_INPUTS:
            flags[key] = as_bool(value, f"request parameter {key!r}")
        else:
            sampling[key] = value

    sp = get_input("sampling_parameters")
    if sp is not None:
        sampling.update(sampling_parameters_json(_single_string(sp, "sampling_parameters")))

    sampling = drop_neutral_vllm_keys(sampling)
    top_logprobs = logprobs_count(sampling.pop("logprobs", None))
    if top_logprobs is not None:
        sampling["top_logprobs"] = top_logprobs
    if flags["return_logprobs"]:
        sampling["logprobs"] = True
    try:
        params = SamplingParams.from_dict(sampling)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    except Exception as exc:  # msgspec / type errors from odd values: still the client's fault
        raise RequestError(f"invalid sampling parameters: {exc}") from None

    prompt, prompt_text = _prompt(get_input, vocab_size)
    return ParsedRequest(prompt=prompt, params=params, prompt_text=prompt_text, vllm_logprobs=top_logprobs is not None,
                         **{k: bool(v) for k, v in flags.items()})


# ---------------------------------------------------------------- prompt


def _prompt(get_input: InputGetter, vocab_size: int | None) -> tuple[str | list[int], str | None]:
    ids = get_input("input_ids")
    text = get_input("text_input")
    prompt_text = _single_string(text, "text_input") if text is not None else None
    if ids is not None and text is not None:
        raise RequestError("the request has both text_input and input_ids: send one of them "
                           "(text_input for text, input_ids for token ids)")
    if ids is not None:
        return _input_ids(ids, vocab_size), prompt_text
    if prompt_text is None:
        raise RequestError("the request has no prompt: send the text_input tensor (STRING, shape [1]) "
                           "or input_ids (INT32, shape [N])")
    if prompt_text == "":
        raise RequestError("text_input is empty: send at least one character of prompt")
    return prompt_text, prompt_text


def _input_ids(array: np.ndarray, vocab_size: int | None) -> list[int]:
    array = np.asarray(array)
    if array.dtype.kind not in "iu":
        raise RequestError(f"input_ids must be an integer tensor (INT32), got {_dtype_name(array)}")
    flat = array.reshape(-1)
    if flat.size == 0:
        raise RequestError("input_ids is empty: send at least one token id")
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0:
        raise RequestError(f"input_ids holds a negative token id ({lo}); ids must be in [0, vocab size)")
    if vocab_size is not None and hi >= vocab_size:
        raise RequestError(f"input_ids holds token id {hi}, outside the model's vocabulary of {vocab_size}")
    return [int(x) for x in flat]


# ---------------------------------------------------------------- tensors


def _single_string(array: Any, name: str) -> str:
    array = np.asarray(array)
    if array.dtype.kind not in "OSU":
        raise RequestError(f"{name} must be a STRING (BYTES) tensor, got {_dtype_name(array)}")
    if array.size != 1:
        raise RequestError(f"{name} must hold exactly one string (shape [1]), got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name} is not valid UTF-8 (bad byte at offset {exc.start}); "
                               "encode the text as UTF-8") from None
    if isinstance(value, str):
        require_encodable(value, name)
        return value
    raise RequestError(f"{name} must hold a string, got {type(value).__name__}")


def _bool_input(get_input: InputGetter, name: str) -> bool:
    array = get_input(name)
    if array is None:
        return False
    array = np.asarray(array)
    if array.dtype != np.bool_:
        raise RequestError(f"{name} must be a BOOL tensor, got {_dtype_name(array)}")
    if array.size != 1:
        raise RequestError(f"{name} must hold exactly one value (shape [1]), got shape {list(array.shape)}")
    return bool(array.reshape(-1)[0])


def _flat_sampling_input(get_input: InputGetter, name: str) -> Any:
    array = get_input(name)
    if array is None:
        return None
    array = np.asarray(array)
    dtype, _ = FLAT_SAMPLING_INPUTS[name]
    kind = array.dtype.kind
    expected = {"TYPE_INT32": "iu", "TYPE_INT64": "iu", "TYPE_FP32": "fiu", "TYPE_BOOL": "b",
                "TYPE_STRING": "OSU"}[dtype]
    if kind not in expected:
        raise RequestError(f"{name} must be a {dtype[5:]} tensor, got {_dtype_name(array)}")
    flat = array.reshape(-1)
    if name == "stop":
        return [_single_string(np.array([x], dtype=object), "stop") for x in flat]
    if name == "stop_token_ids":
        return [int(x) for x in flat]
    if flat.size != 1:
        raise RequestError(f"{name} must hold exactly one value (shape [1]), got shape {list(array.shape)}")
    value = flat[0].item()
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value}")
    return value


def _dtype_name(array: np.ndarray) -> str:
    return {"O": "BYTES", "S": "BYTES", "U": "BYTES", "b": "BOOL"}.get(array.dtype.kind, str(array.dtype).upper())
