"""The request's sampling settings given as JSON: Triton request parameters (``{"parameters":
{"max_tokens": 16}}`` on /generate) and the vLLM backend's ``sampling_parameters`` string tensor.

Every key is checked here (an unknown one is named with the known ones), vLLM keys that clients
send with their neutral values are dropped, and anything a client can get wrong raises
`RequestError`.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Mapping

from minisgl_backend.coerce import to_bool, to_int
from minisgl_backend.sampling_params import SamplingParams
from minisgl_backend.structured_outputs import LEGACY_KEYS
from minisgl_backend.triton.contract import BOOL_INPUTS

# SamplingParams' fields, and vLLM's older `guided_*` structured-output keys (in request
# parameters, where values are strings, they arrive as JSON text)
SAMPLING_KEYS = frozenset(SamplingParams.__struct_fields__) | frozenset(LEGACY_KEYS)

# vLLM sampling keys that clients (genai-perf, OpenAI frontends) send with their default values:
# accepted when they ask for nothing we do not do, refused otherwise.
_VLLM_NEUTRAL = {
    "n": (1,),
    "best_of": (1, None),
    "use_beam_search": (False,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "include_stop_str_in_output": (False,),
    "detokenize": (True,),
}


class RequestError(ValueError):
    """The request cannot be served as sent; str(error) tells the client what to change."""


def _load_json(text: str, where: str, hint: str) -> Any:
    """json.loads whose every failure is the client's: invalid, too deeply nested, lone surrogates."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno} "
                           f"column {exc.colno}); {hint}") from None
    except RecursionError:
        raise RequestError(f"{where} is nested too deeply (JSON arrays/objects more than "
                           f"{sys.getrecursionlimit()} levels deep); {hint}") from None
    _check_unicode(value, where)
    return value


def _check_unicode(value: Any, where: str) -> None:
    """Refuse strings that cannot be encoded as UTF-8 (a JSON "\\ud800" escape decodes to a lone
    surrogate, which every later encode would trip over)."""
    todo: list[tuple[Any, str]] = [(value, where)]
    while todo:
        item, path = todo.pop()
        if isinstance(item, str):
            require_encodable(item, path)
        elif isinstance(item, dict):
            for key, sub in item.items():
                require_encodable(key, f"a key of {path}")
                todo.append((sub, f"{path}[{key!r}]"))
        elif isinstance(item, list):
            todo.extend((sub, f"{path}[{i}]") for i, sub in enumerate(item))


def require_encodable(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise RequestError(f"{path} holds a lone UTF-16 surrogate ({ascii(bad)} at character {exc.start}), "
                           "which is not valid Unicode text; send valid UTF-8 / paired surrogates") from None


def sampling_parameters_json(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    value = _load_json(text, "sampling_parameters", 'send an object like {"max_tokens": 16}')
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"sampling_parameters must be a JSON object like {{\"max_tokens\": 16}}, "
                           f"got {type(value).__name__}")
    _check_keys(value, "sampling_parameters", allow_flags=False)
    return value


def request_parameters(parameters_json: str | bytes | None) -> dict[str, Any]:
    if parameters_json is None:
        return {}
    if isinstance(parameters_json, (bytes, bytearray)):
        parameters_json = parameters_json.decode("utf-8", errors="replace")
    if isinstance(parameters_json, Mapping):
        raw = dict(parameters_json)
        _check_unicode(raw, "request parameters")
    else:
        if not parameters_json.strip():
            return {}
        raw = _load_json(parameters_json, "request parameters", 'send an object like {"max_tokens": 16}')
    if not isinstance(raw, dict):
        raise RequestError("request parameters must be a JSON object")
    # Triton's own bookkeeping keys are not ours to judge
    params = {k: v for k, v in raw.items() if not k.startswith("triton_") and not k.startswith("_")}
    _check_keys(params, "request parameter", allow_flags=True)
    return params


def _check_keys(values: Mapping[str, Any], where: str, allow_flags: bool) -> None:
    known = set(SAMPLING_KEYS) | set(_VLLM_NEUTRAL) | (set(BOOL_INPUTS) if allow_flags else set())
    for key in values:
        if key not in known:
            raise RequestError(f"unknown {where} {key!r}; known sampling keys: {', '.join(sorted(SAMPLING_KEYS))}"
                               + (f"; switches: {', '.join(BOOL_INPUTS)}" if allow_flags else ""))


def drop_neutral_vllm_keys(sampling: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in sampling.items():
        if key in _VLLM_NEUTRAL:
            if _normalise(value) not in _VLLM_NEUTRAL[key]:
                raise RequestError(f"sampling parameter {key!r}={value!r} is not supported; "
                                   f"only {_VLLM_NEUTRAL[key][0]!r} is")
            continue
        out[key] = value
    return out


def _normalise(value: Any) -> Any:
    """"true" -> True, "1" -> 1, "null" -> None: how a neutral vLLM value may be spelt."""
    if not isinstance(value, str):
        return value
    if value.strip().lower() in ("none", "null"):
        return None
    for coerce in (to_int, to_bool):
        try:
            return coerce(value)
        except ValueError:
            pass
    return value


def logprobs_count(value: Any) -> int | None:
    """The sampling key `logprobs`: a count of alternatives per token (vLLM: 0 = the sampled token
    only) gives it; a boolean (or null) says nothing more than the `return_logprobs` switch."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "null", "none", ""):
        return None
    try:
        return to_int(value)
    except ValueError:
        raise RequestError(f"sampling parameter 'logprobs' must be a number of alternatives per token "
                           f"(0-20) or a boolean, got {value!r}") from None


def as_bool(value: Any, what: str) -> bool:
    try:
        return to_bool(value)
    except ValueError:
        raise RequestError(f"{what} must be a boolean (true/false), got {value!r}") from None
