"""The one set of value coercers for user-supplied settings.

Triton parameters, `config.pbtxt` values and JSON sampling fields often arrive as strings;
config.py, sampling_params.py and triton/parsing.py all convert through these functions, so a
value means the same thing wherever it is sent. Each raises ValueError on a value it refuses.
"""

from __future__ import annotations

import os
from typing import Any

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def to_bool(raw: Any) -> bool:
    """bool, 0/1, or one of true/false, 1/0, yes/no, on/off (any case)."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"not a boolean: {raw!r}")


def to_int(raw: Any) -> int:
    """int, an integral float, or a string of either ("16", "16.0"); never a bool."""
    if isinstance(raw, bool):
        raise ValueError(f"not an integer: {raw!r}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(f"not an integer: {raw!r}")
        return int(raw)
    if isinstance(raw, str):
        text = raw.strip()
        try:
            return int(text)
        except ValueError:
            return to_int(float(text))
    raise ValueError(f"not an integer: {raw!r}")


def to_float(raw: Any) -> float:
    """int, float or a numeric string; never a bool."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ValueError(f"not a number: {raw!r}")
    return float(raw)


def to_str(raw: Any) -> str:
    """A string or a path."""
    if isinstance(raw, os.PathLike):
        return os.fspath(raw)
    if not isinstance(raw, str):
        raise ValueError(f"not a string: {raw!r}")
    return raw


COERCERS = {bool: to_bool, int: to_int, float: to_float, str: to_str}
