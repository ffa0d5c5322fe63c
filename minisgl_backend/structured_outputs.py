"""What a request constrains its output to, parsed and normalised (no xgrammar needed here).

The vLLM shape: `structured_outputs` is an object (or its JSON text) with exactly one of
`json` (a JSON schema: object or JSON text), `json_object` (true: any JSON object), `regex`,
`choice` (a list of strings) or `grammar` (EBNF, root rule `root`). The older flat keys
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` mean the same.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import msgspec

KINDS = ("json", "json_object", "regex", "choice", "grammar")
LEGACY_KEYS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
               "guided_grammar": "grammar"}
# vLLM options we accept with their neutral value only.
_NEUTRAL_OPTIONS = {"disable_fallback": (False, None), "disable_any_whitespace": (True, False, None),
                    "disable_additional_properties": (True, False, None), "whitespace_pattern": (None,),
                    "structural_tag": (None,)}


class StructuredOutputs(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """One normalised constraint: exactly one field is set. `json` is compact JSON text (key order
    kept: it is the order of the output's keys), so equal schemas share one compile (the cache key)."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """Hashable identity of the constraint (kind, normalised text)."""
        value = getattr(self, self.kind)
        if self.kind == "choice":
            return "choice", json.dumps(value)
        return self.kind, "" if value is True else value


def parse_structured_outputs(raw: Any, field: str = "structured_outputs") -> StructuredOutputs:
    """Parse a user value (object, JSON text or an existing StructuredOutputs); ValueError names the field."""
    if isinstance(raw, StructuredOutputs):
        return raw
    if isinstance(raw, str):
        raw = _json_text(raw, field)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{field} must be an object (or its JSON text) with one of {', '.join(KINDS)}; "
                         f"got {type(raw).__name__}")
    unknown = [k for k in raw if k not in KINDS and k not in _NEUTRAL_OPTIONS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in {field}; use exactly one of {', '.join(KINDS)}")
    for key, allowed in _NEUTRAL_OPTIONS.items():
        if key in raw and raw[key] not in allowed:
            raise ValueError(f"{field}.{key}={raw[key]!r} is not supported")
    given = [k for k in KINDS if k in raw and raw[k] is not None and raw[k] is not False]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise ValueError(f"{field} needs exactly one of {', '.join(KINDS)}; got {what}")
    kind = given[0]
    return StructuredOutputs(**{kind: _NORMALISERS[kind](raw[kind], f"{field}.{kind}")})


def from_legacy_keys(values: Mapping[str, Any]) -> StructuredOutputs | None:
    """The `guided_*` keys present in `values` (None when there is none)."""
    present = {LEGACY_KEYS[k]: v for k, v in values.items() if k in LEGACY_KEYS and v is not None}
    if not present:
        return None
    if len(present) > 1:
        names = " and ".join(k for k in values if k in LEGACY_KEYS and values[k] is not None)
        raise ValueError(f"{names} were both given: a request takes one constraint")
    (kind, value), = present.items()
    field = next(k for k, v in LEGACY_KEYS.items() if v == kind)
    return StructuredOutputs(**{kind: _NORMALISERS[kind](value, field)})


def _json_text(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{field} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def _schema(value: Any, field: str) -> str:
    if isinstance(value, str):
        value = _json_text(value, field)
    if not isinstance(value, (dict, bool)):
        raise ValueError(f"{field} must be a JSON schema (an object or its JSON text), got {type(value).__name__}")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # key order kept: it is the output order


def _true(value: Any, field: str) -> bool:
    if value is not True:
        raise ValueError(f"{field} must be true, got {value!r}")
    return True


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty string, got {value!r}")
    return value


def _choices(value: Any, field: str) -> list[str]:
    if isinstance(value, str):  # JSON text of the list (Triton request parameters are strings)
        value = _json_text(value, field)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{field} must be a non-empty list of strings, got {value!r}")
    if not all(isinstance(s, str) and s for s in value):
        raise ValueError(f"{field} must hold non-empty strings only, got {value!r}")
    return list(value)


_NORMALISERS = {"json": _schema, "json_object": _true, "regex": _text, "choice": _choices, "grammar": _text}
