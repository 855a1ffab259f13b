"""Typed options: a dataclass field with its help text (stage 0).

Configurations (:class:`winnow.TrainConfig`, the experiments' configs) declare each field with
:func:`option`, so the command line is generated from them (:mod:`winnow.cli.options`): every
option with its help, its default, and its choices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

MISSING: Any = dataclasses.MISSING


def option(
    default: Any = MISSING,
    *,
    help: str,
    choices: Sequence[Any] | None = None,
    factory: Callable[[], Any] | None = None,
    exclusive: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with ``help`` text (and ``choices``) for the generated command line.

    ``factory`` builds a mutable or nested default; ``exclusive`` names a group of fields of
    which a command line sets at most one (the others then take None: a budget in epochs or in
    iterations); ``cli=False`` keeps the field off the command line.
    """
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "exclusive": exclusive,
        "cli": cli,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
