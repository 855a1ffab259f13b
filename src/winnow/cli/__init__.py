"""The ``winnow`` command (the top stage: it may use every other).

    winnow demo                       the main job (what ``make demo`` runs): a small
                                      lottery-ticket experiment
    winnow experiment lottery --rounds 18 --rate 0.2 --seeds 0,1,2
    winnow train --model lenet300 --data fashion-mnist --epochs 5
    winnow models | winnow datasets | winnow --version

Every command is one :class:`~winnow.cli.command.Command` in :data:`COMMANDS`: its options and
what it runs.
Errors are reported as one line (``winnow: error: ...``) with exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence

from winnow._version import __version__
from winnow.cli import accelerate, commands, formats, oneshot
from winnow.cli.command import Command
from winnow.cli.experiments import add_experiments, run_experiment
from winnow.devices import resolve_device

COMMANDS = (
    Command(
        "demo",
        "the main job: a small lottery-ticket experiment on LeNet-300-100",
        commands.add_demo,
        commands.run_demo,
        timed=True,
    ),
    Command(
        "train",
        "train a model of the zoo on a dataset",
        commands.add_train,
        commands.run_train,
        timed=True,
    ),
    Command(
        "prune-at-init",
        "prune a freshly initialised model (SNIP, GraSP, SynFlow, ...)",
        commands.add_prune_at_init,
        commands.run_prune_at_init,
    ),
    Command(
        "experiment",
        "run or report a stored, resumable experiment",
        add_experiments,
        run_experiment,
    ),
    Command("models", "list the model zoo", None, commands.run_models),
    Command(
        "datasets",
        "list the datasets and whether their files are here",
        None,
        commands.run_datasets,
    ),  # fmt: skip
    *oneshot.COMMANDS,
    *accelerate.COMMANDS,
    *formats.COMMANDS,
)


def parser() -> argparse.ArgumentParser:
    """The ``winnow`` argument parser, one subparser per :data:`COMMANDS` entry."""
    top = argparse.ArgumentParser(prog="winnow", description="Pruning neural networks in PyTorch.")
    top.add_argument("--version", action="version", version=f"winnow {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        one = sub.add_parser(command.name, help=command.help, description=command.help)
        if command.add_options is not None:
            command.add_options(one)
    return top


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each (no source line, no file path)."""
    text = " ".join(str(message).split())
    print(f"winnow: warning: {text}", file=file if file is not None else sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``winnow`` command; returns the exit status."""
    warnings.showwarning = _show_warning
    args = parser().parse_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    started = time.perf_counter()
    try:
        if getattr(args, "device", None) is not None:
            resolve_device(args.device)  # before any work: one line, not a traceback
        command.run(args)
    except (ValueError, KeyError, FileNotFoundError, ImportError, OSError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"winnow: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("winnow: interrupted", file=sys.stderr)
        return 130
    if command.timed:
        print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
