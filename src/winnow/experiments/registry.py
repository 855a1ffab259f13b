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

from winnow.experiments.parallel import Parallel, run_parallel
from winnow.experiments.runner import SweepSummary, run_sweep
from winnow.experiments.store import Run, RunStore


@dataclass(frozen=True)
class Axis:
    """A configuration field a sweep varies: ``field`` takes every value of the list option
    ``--<option>``, each read by ``kind`` (a type, or a parser such as
    :func:`winnow.options.parse_fraction`)."""

    field: str
    option: str
    kind: Callable[[str], Any]
    default: tuple
    help: str

    def values(self, given: Sequence[Any] | None) -> tuple:
        """The configuration values for the command-line values ``given`` (None: default)."""
        return self.default if given is None else tuple(given)

    def shown_default(self) -> str:
        """The default as the command line writes it."""
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in self.default)


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
        self,
        results: str | os.PathLike,
        configs: Sequence[Any],
        progress: bool = True,
        parallel: Parallel | None = None,
    ) -> tuple[RunStore, SweepSummary]:
        """Execute ``configs`` into the run store at ``results`` (finished runs are skipped;
        a run stopped halfway resumes): in this process, or on the workers ``parallel``
        describes (:mod:`winnow.experiments.parallel`; ``parallel.workers == 1`` with no engine
        is this process)."""
        parallel = parallel or Parallel()
        store = RunStore(results, lease_seconds=parallel.lease_seconds)
        if parallel.kind != "serial":
            summary = run_parallel(
                store, self.name, list(configs), self.execute, parallel, progress=progress
            )
            return store, summary
        import torch

        threads = torch.get_num_threads()
        if parallel.threads_per_run is not None:
            torch.set_num_threads(parallel.threads_per_run)
        try:
            summary = run_sweep(store, self.name, list(configs), self.execute, progress=progress)
        finally:
            torch.set_num_threads(threads)
        return store, summary


EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Add ``experiment`` to :data:`EXPERIMENTS` (its name must be new)."""
    if experiment.name in EXPERIMENTS:
        raise ValueError(f"an experiment named {experiment.name!r} is already registered")
    EXPERIMENTS[experiment.name] = experiment
    return experiment
