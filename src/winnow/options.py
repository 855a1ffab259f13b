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
    fraction: bool = False,
) -> Any:
    """A dataclass field with ``help`` text (and ``choices``) for the generated command line.

    ``factory`` builds a mutable or nested default; ``exclusive`` names a group of fields of
    which a command line sets at most one (the others then take None: a budget in epochs or in
    iterations); ``cli=False`` keeps the field off the command line; ``fraction`` marks a
    fraction (a density, a rate, a budget) that the command line also takes in percent with an
    explicit ``%`` (:func:`parse_fraction`).
    """
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "exclusive": exclusive,
        "cli": cli,
        "fraction": fraction,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parse_fraction(text: str) -> float:
    """A fraction as the command line writes it: ``0.1`` or ``10%`` (both 0.1).

    One unit everywhere: densities (the fraction of weights kept), sparsities, pruning rates
    (the fraction of the remaining weights removed per round) and FLOPs budgets are fractions;
    percent needs the ``%``. A bare number above 1 is refused (``ValueError``), so ``10`` meant
    as percent never passes as something else.
    """
    written = text.strip()
    try:
        value = float(written[:-1]) / 100 if written.endswith("%") else float(written)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a fraction (write 0.1 or 10%)") from None
    if not written.endswith("%") and value > 1:
        raise ValueError(f"{text!r} is above 1: write a fraction (0.1) or a percent with % (10%)")
    return value


parse_fraction.__name__ = "fraction"  # what argparse's messages and metavars call it
