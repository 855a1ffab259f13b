"""Values as plain JSON data, and canonical JSON text.

One conversion for everything winnow writes as JSON (run configurations, records, file
metadata, architecture specs): tuples become lists, numpy and torch scalars and small arrays
become Python numbers and lists, enums their values, paths strings; a dataclass met on the way
is converted by the caller's rule. Text is strict JSON (no NaN) with sorted keys, so the same
value always gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

MAX_DEPTH = 64
"""Nesting deeper than this is refused when reading (no ``RecursionError`` from a crafted file)."""


def _refuse_dataclass(value: Any, where: str) -> Any:
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored as JSON")


def to_json(
    value: Any,
    where: str = "value",
    *,
    finite: bool = True,
    dataclass: Callable[[Any, str], Any] = _refuse_dataclass,
) -> Any:
    """``value`` as plain JSON data (dicts with string keys, lists, numbers, strings, None).

    With ``finite`` NaN and infinities become ``None`` (JSON has no such numbers); otherwise
    they are kept (and :func:`dumps` refuses them). ``dataclass(value, where)`` converts a
    dataclass instance (by default an error). ``TypeError`` names the path ``where`` of a value
    that has no JSON form.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if finite and not math.isfinite(value) else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclass(value, where)
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays, torch tensors
        return to_json(value.tolist(), where, finite=finite, dataclass=dataclass)
    if isinstance(value, enum.Enum):
        return to_json(value.value, where, finite=finite, dataclass=dataclass)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [
            to_json(v, f"{where}[{i}]", finite=finite, dataclass=dataclass)
            for i, v in enumerate(value)
        ]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string")
            out[key] = to_json(item, f"{where}.{key}", finite=finite, dataclass=dataclass)
        return out
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored as JSON")


def dumps(value: Any, *, indent: int | None = None, sort_keys: bool = True) -> str:
    """Strict JSON text: no NaN, compact unless ``indent`` is given; with ``sort_keys``
    (the default) canonical, so equal values give equal bytes. Keep the keys' own order
    (``sort_keys=False``) where it carries meaning, such as layers in model order."""
    separators = (",", ":") if indent is None else None
    return json.dumps(
        value, allow_nan=False, sort_keys=sort_keys, indent=indent, separators=separators
    )


def loads(text: str | bytes) -> Any:
    """Parse JSON text; ``ValueError`` for invalid text or nesting deeper than
    :data:`MAX_DEPTH` (checked without recursion before parsing)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    if deepest > MAX_DEPTH:
        raise ValueError(f"JSON nested {deepest} deep (at most {MAX_DEPTH})")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
