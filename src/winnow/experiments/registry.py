"""The experiments winnow runs, each described once: its configuration, the axes a sweep
varies, how one run executes, and how the report is rebuilt.

``winnow experiment <name>`` and ``winnow experiment report <name>`` are generated from
these descriptions (:mod:`winnow.cli.experiments`): an axis becomes a comma-separated list
option (``--densities 10,1``), every other configuration field an option of its own. Adding an
experiment is one module that defines its configuration, ``sweep``, ``execute`` and ``report``
and calls :func:`register`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from winnow.experiments.runner import SweepSummary, run_sweep
from winnow.experiments.store import Run, RunStore


@dataclass(frozen=True)
class Axis:
    """A configuration field a sweep varies: ``field`` takes every value of the list option
    ``--<option>``, whose values are of type ``kind`` and counted in ``unit`` (100: the
    command line says percent, the configuration holds fractions)."""

    field: str
    option: str
    kind: type
    default: tuple
    help: str
    unit: float = 1.0

    def values(self, given: Sequence[Any] | None) -> tuple:
        """The configuration values for the command-line values ``given`` (None: default)."""
        if given is None:
            return self.default
        return tuple(v / self.unit if self.unit != 1.0 else v for v in given)

    def shown_default(self) -> str:
        """The default as the command line writes it."""
        values = self.default if self.unit == 1.0 else [v * self.unit for v in self.default]
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclass(frozen=True)
class Experiment:
    """One experiment: ``sweep(**{axis.option: values}, **fields) -> configs``,
    ``execute(run)`` for one configuration, ``report(results, out=None) -> paths``."""

    name: str
    help: str
    config: type
    axes: tuple[Axis, ...]
    sweep: Callable[..., list[Any]]
    execute: Callable[[Run], None]
    report: Callable[..., dict[str, Path]]

    def run(
        self, results: str | os.PathLike, configs: Sequence[Any], progress: bool = True
    ) -> tuple[RunStore, SweepSummary]:
        """Execute ``configs`` into the run store at ``results`` (finished runs are skipped;
        a run stopped halfway resumes)."""
        store = RunStore(results)
        summary = run_sweep(store, self.name, list(configs), self.execute, progress=progress)
        return store, summary


EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Add ``experiment`` to :data:`EXPERIMENTS` (its name must be new)."""
    if experiment.name in EXPERIMENTS:
        raise ValueError(f"an experiment named {experiment.name!r} is already registered")
    EXPERIMENTS[experiment.name] = experiment
    return experiment
