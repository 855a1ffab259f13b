"""Run a sweep: a list of independent configurations, each run once, resumable.

A run function takes a :class:`~winnow.experiments.store.Run` and does the work of one
configuration (``run.config``), writing its files into ``run.dir`` and its metrics with
``run.record``. :func:`run_sweep` skips the configurations already done, marks each run done,
failed or interrupted, and goes on after a failure.

Resuming inside a run is the run function's job, with :meth:`Run.completed
<winnow.experiments.store.Run.completed>`: for each step (a pruning round, an epoch), write
the step's files first and record the step last. The record is the commit point, so a run
killed halfway finds the steps it committed and starts after the last one::

    def lottery(run: Run) -> None:
        done = run.completed("round")
        for k in range(run.config.rounds):
            if k in done:
                continue
            masks = ...  # derived from round k - 1 (read back with Masks.load)
            masks.save(run.path(f"masks_{k}.safetensors"))
            run.record("round", k, {"density": masks.density(), "test_acc": ...})
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from winnow.experiments.configs import config_id
from winnow.experiments.store import Run, RunStore
from winnow.io import atomic_write_bytes


@dataclass
class SweepSummary:
    """What :func:`run_sweep` did: runs completed, runs skipped (already done), failures.

    ``ran`` counts the runs that completed in this call; ``failed`` lists ``(run_id, error)``
    for the runs that raised (their full traceback is in ``traceback.txt`` in the run dir).
    """

    ran: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def _one_line(err: BaseException) -> str:
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def run_sweep(
    store: RunStore,
    experiment: str,
    configs: Sequence[Any],
    run: Callable[[Run], None],
    progress: bool = True,
    stop_on_error: bool = False,
) -> SweepSummary:
    """Run ``run`` once for each configuration of ``configs`` that is not done yet, in order.

    For each configuration: a run already 'done' in ``store`` is skipped; otherwise
    :meth:`RunStore.begin` starts (or restarts) it, ``run(run_obj)`` does the work and the
    run is marked done. Configurations with the same :func:`config_id` run once.

    An exception marks the run 'failed' with a one-line error (its type and message) and a
    ``traceback.txt`` in the run directory; the sweep goes on, or re-raises with
    ``stop_on_error``. A ``KeyboardInterrupt`` (or ``SystemExit``) marks the run
    'interrupted' and is re-raised. Shows a progress bar over the runs unless ``progress`` is
    False.
    """
    unique: dict[str, Any] = {}
    for config in configs:
        unique.setdefault(config_id(config), config)
    summary = SweepSummary()
    bar = tqdm(total=len(unique), desc=experiment, unit="run", disable=None if progress else True)
    with bar:
        for run_id, config in unique.items():
            bar.set_postfix_str(run_id)
            if store.status(experiment, run_id) == "done":
                summary.skipped += 1
                bar.update()
                continue
            current = store.begin(experiment, config)
            try:
                run(current)
            except Exception as err:
                error = _one_line(err)
                atomic_write_bytes(current.path("traceback.txt"), traceback.format_exc().encode())
                current.fail(error)
                summary.failed.append((run_id, error))
                tqdm.write(f"{experiment}/{run_id} failed: {error}", file=sys.stderr)
                if stop_on_error:
                    raise
            except BaseException:
                current.interrupted()
                raise
            else:
                current.finish()
                summary.ran += 1
            bar.update()
    return summary
