"""Command-line options generated from configuration dataclasses.

Every field declared with :func:`winnow.options.option` becomes ``--field-name`` with its help
text, its default and its choices; a field that holds another configuration (an experiment's
``train: TrainConfig``) contributes that configuration's options, except those the outer one
has under the same name (the run's ``seed`` sets the training seed). Fields in one
``exclusive`` group (``epochs`` / ``iterations``) are mutually exclusive on the command line,
and setting one clears the others. Tuples are comma-separated lists; booleans take
``--flag`` / ``--no-flag``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from winnow.experiments.configs import dataclass_in
from winnow.options import parse_fraction


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def csv_list(text: str, kind: Callable[[str], Any] = str) -> tuple:
    """``"a, b,c"`` as ``(kind(a), kind(b), kind(c))``; a clear error otherwise (the parser's
    own message when ``kind`` is :func:`~winnow.options.parse_fraction`)."""
    try:
        return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
    except ValueError as err:
        if kind is parse_fraction:
            raise argparse.ArgumentTypeError(str(err)) from None
        raise ValueError(f"cannot read {text!r} as a comma-separated list") from None


def fraction_argument(text: str) -> float:
    """:func:`winnow.options.parse_fraction`, its message shown by argparse as it is."""
    try:
        return parse_fraction(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _converter(hint: Any) -> tuple[Callable[[str], Any], str]:
    """How to read a command-line string for a field of type ``hint``, and a metavar."""
    if typing.get_origin(hint) is tuple:
        (element, *_) = typing.get_args(hint) or (str,)
        return (lambda text: csv_list(text, element)), f"{element.__name__.upper()},..."
    if hint in (int, float, str):
        return hint, hint.__name__.upper()
    raise TypeError(f"no command-line form for a field of type {hint!r}")


def _default(field: dataclasses.Field, base: Any) -> Any:
    if base is not None:
        return getattr(base, field.name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True)]


def add_config_options(
    parser: argparse.ArgumentParser,
    cls: type,
    base: Any = None,
    skip: Iterable[str] = (),
    prefix: str = "",
) -> None:
    """Add an option for every field of the configuration class ``cls`` (defaults from
    ``base``, an instance, else the class's), except the fields named in ``skip``."""
    skip = set(skip)
    hints = typing.get_type_hints(cls)
    outer = {f.name for f in dataclasses.fields(cls)}
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for field in _fields(cls):
        if field.name in skip:
            continue
        default = _default(field, base)
        nested = dataclass_in(hints[field.name])
        if nested is not None:
            add_config_options(parser, nested, default, skip | outer, f"{prefix}{field.name}.")
            continue
        group = field.metadata.get("exclusive")
        target = parser
        if group:
            if group not in groups:
                groups[group] = parser.add_mutually_exclusive_group()
            target = groups[group]
        help_text = f"{field.metadata.get('help', '')} (default: {_shown(default)})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": prefix + field.name, "default": None, "help": help_text}
        hint, _ = _unwrap(hints[field.name])
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"], kwargs["metavar"] = _converter(hint)
            if field.metadata.get("fraction"):
                kwargs["type"], kwargs["metavar"] = fraction_argument, "FRACTION"
            if field.metadata.get("choices"):
                kwargs["choices"] = field.metadata["choices"]
                kwargs.pop("metavar")
        target.add_argument("--" + field.name.replace("_", "-"), **kwargs)


def config_from_args(
    cls: type,
    args: argparse.Namespace,
    base: Any = None,
    skip: Iterable[str] = (),
    prefix: str = "",
    **values: Any,
) -> Any:
    """The configuration the command line asks for: ``base`` (or the class's defaults) with
    every option given replaced, ``values`` on top; the class validates it as usual."""
    skip = set(skip)
    given = vars(args)
    hints = typing.get_type_hints(cls)
    outer = {f.name for f in dataclasses.fields(cls)}
    chosen: dict[str, Any] = {}
    cleared: set[str] = set()
    fields = _fields(cls)
    for field in fields:
        if field.name in skip or field.name in values:
            continue
        nested = dataclass_in(hints[field.name])
        default = _default(field, base)
        if nested is not None:
            chosen[field.name] = config_from_args(
                nested, args, default, skip | outer, f"{prefix}{field.name}."
            )
            continue
        value = given.get(prefix + field.name)
        if value is None:
            continue
        chosen[field.name] = value
        group = field.metadata.get("exclusive")
        if group:
            cleared |= {f.name for f in fields if f.metadata.get("exclusive") == group}
    for name in cleared - set(chosen):
        chosen[name] = None
    chosen.update(values)
    if base is not None:
        return dataclasses.replace(base, **chosen)
    return cls(**chosen)
