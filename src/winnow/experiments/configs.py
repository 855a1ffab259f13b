"""Typed configurations of runs: their ids, and their conversion to and from JSON data.

A run is identified by ``config_id(config)``, a hash of the configuration's non-default fields
(OpenLTH's scheme, Frankle et al.): adding a field with a default keeps every old id valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

from winnow.io import to_json


def _check_config(config: Any) -> None:
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"a configuration is a dataclass instance, not {type(config).__name__}")


def _config_fields(config: Any) -> list[dataclasses.Field]:
    """The fields a configuration is built from (``init=False`` fields are derived ones)."""
    return [f for f in dataclasses.fields(config) if f.init]


def _as_declared(value: Any, hint: Any) -> Any:
    """An int given for a field declared ``float`` (or ``float | None``) as that float, so that
    ``epochs=3`` and ``epochs=3.0`` are one configuration with one id."""
    if isinstance(value, int) and not isinstance(value, bool):
        if hint is float or float in typing.get_args(hint):
            return float(value)
    return value


def _non_default(config: Any, where: str) -> dict[str, Any]:
    """The fields whose value differs from their default (nested configurations likewise)."""

    def canonical(value: Any, at: str) -> Any:
        return to_json(value, at, finite=False, dataclass=_identity)

    hints = typing.get_type_hints(type(config))
    out = {}
    for f in _config_fields(config):
        at = f"{where}.{f.name}"
        value = canonical(_as_declared(getattr(config, f.name), hints.get(f.name)), at)
        if f.default is not dataclasses.MISSING:
            default = canonical(f.default, at)
        elif f.default_factory is not dataclasses.MISSING:
            default = canonical(f.default_factory(), at)
        else:
            out[f.name] = value
            continue
        if value != default:
            out[f.name] = value
    return out


def _identity(config: Any, where: str) -> dict[str, Any]:
    """What identifies a configuration: its class name and its non-default fields."""
    return {"type": type(config).__name__, "fields": _non_default(config, where)}


def config_id(config: Any) -> str:
    """The id of a configuration: 12 hex digits of a SHA-256 of its non-default fields.

    ``config`` is a (frozen) dataclass instance. The hash covers the canonical JSON (sorted
    keys, compact) of ``{"type": class name, "fields": {name: value}}`` with only the fields
    whose value differs from their default (nested dataclasses likewise), so adding a field
    with a default keeps old ids valid, and two configurations that differ in any non-default
    value get different ids. Tuples count as lists.
    """
    _check_config(config)
    text = json.dumps(
        _identity(config, type(config).__name__), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def config_to_dict(config: Any) -> dict[str, Any]:
    """Every field of a configuration as plain JSON data (nested dataclasses as dicts)."""
    _check_config(config)
    return _all_fields(config, type(config).__name__)


def _all_fields(config: Any, where: str) -> dict[str, Any]:
    return {
        f.name: to_json(
            getattr(config, f.name), f"{where}.{f.name}", finite=False, dataclass=_all_fields
        )
        for f in _config_fields(config)
    }


def dataclass_in(hint: Any) -> type | None:
    """The dataclass type a field annotation names (directly or as ``X | None``), if any."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build a configuration of class ``cls`` from :func:`config_to_dict`'s output.

    Missing keys take their defaults; an unknown key raises ``ValueError`` naming it. Lists
    come back as tuples (configurations are frozen and hashable), and a field annotated with a
    dataclass type is rebuilt from its nested dict. The class's own validation runs as usual.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in _config_fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}")
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        hints = {}
    kwargs = {}
    for name, value in data.items():
        nested = dataclass_in(hints.get(name))
        if nested is not None and isinstance(value, Mapping):
            kwargs[name] = config_from_dict(nested, value)
        else:
            kwargs[name] = _tuples(value)
    return cls(**kwargs)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A configuration dict with nested configurations as dotted keys (``train.epochs``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_run_seed(train: Any) -> None:
    """An experiment's nested training configuration takes the run's seed: its own must be
    left at 0 (``ValueError`` otherwise, rather than a seed silently replaced)."""
    if getattr(train, "seed", 0) != 0:
        raise ValueError("set the run's seed, not train.seed (the run's seed is the training seed)")
