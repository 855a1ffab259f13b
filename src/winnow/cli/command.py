"""A subcommand of ``winnow``: what every command module provides (:data:`COMMANDS` lists)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, its one-line help, its options and what it runs; ``timed``
    commands print how long they took."""

    name: str
    help: str
    add_options: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], None]
    timed: bool = False
