"""Run a sweep: a list of independent configurations, each run once, resumable.

A run function takes a :class:`~winnow.experiments.store.Run` and does the work of one
configuration (``run.config``), writing its files into ``run.dir`` and its metrics with
``run.record``. :func:`run_sweep` skips the configurations already done, marks each run done,
failed or interrupted, and goes on after a failure. It executes each run under its lease in the
store (:meth:`RunStore.claim <winnow.experiments.store.RunStore.claim>`), so several sweeps
over one store, serial ones or parallel ones (:mod:`winnow.experiments.parallel`), each run a
run once and never redo a finished one.

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
import time
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

    ``ran`` counts the runs that completed in this call; ``skipped`` the runs found done
    (before, or by another sweep over the same store meanwhile); ``failed`` lists
    ``(run_id, error)`` for the runs that raised (their full traceback is in
    ``traceback.txt`` in the run dir).
    """

    ran: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def _one_line(err: BaseException) -> str:
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def unique_configs(configs: Sequence[Any]) -> dict[str, Any]:
    """The configurations by run id, in order, each id once."""
    unique: dict[str, Any] = {}
    for config in configs:
        unique.setdefault(config_id(config), config)
    return unique


def execute_run(
    store: RunStore, experiment: str, config: Any, run: Callable[[Run], None]
) -> tuple[str | None, Exception | None]:
    """Begin the run of ``config``, execute ``run`` on it and mark it done; the caller holds
    its lease. Returns ``(None, None)``, or the one-line error and the exception of a run that
    raised (marked 'failed', its traceback in ``traceback.txt``). A ``KeyboardInterrupt`` or
    ``SystemExit`` marks it 'interrupted' and is re-raised."""
    current = store.begin(experiment, config)
    try:
        run(current)
    except Exception as err:
        error = _one_line(err)
        atomic_write_bytes(current.path("traceback.txt"), traceback.format_exc().encode())
        current.fail(error)
        return error, err
    except BaseException:
        current.interrupted()
        raise
    current.finish()
    return None, None


class SweepProgress:
    """One progress bar over a sweep's runs: how many ended (done, skipped or failed), and in
    its postfix how many run now, wait for another sweep's lease, and failed; tqdm gives
    the rate and the time left. Failures are written above it as they happen."""

    def __init__(self, experiment: str, total: int, enabled: bool) -> None:
        self.experiment = experiment
        self.running = self.waiting = self.failed = 0
        self.bar = tqdm(total=total, desc=experiment, unit="run", disable=None if enabled else True)

    def show(self, running: int | None = None, waiting: int | None = None) -> None:
        self.running = self.running if running is None else running
        self.waiting = self.waiting if waiting is None else waiting
        parts = [f"running={self.running}"]
        if self.waiting:
            parts.append(f"waiting={self.waiting}")
        if self.failed:
            parts.append(f"failed={self.failed}")
        self.bar.set_postfix_str(" ".join(parts), refresh=False)
        self.bar.refresh()

    def ended(self, run_id: str, error: str | None = None) -> None:
        if error is not None:
            self.failed += 1
            tqdm.write(f"{self.experiment}/{run_id} failed: {error}", file=sys.stderr)
        self.bar.update()
        self.show()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> SweepProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_sweep(
    store: RunStore,
    experiment: str,
    configs: Sequence[Any],
    run: Callable[[Run], None],
    progress: bool = True,
    stop_on_error: bool = False,
) -> SweepSummary:
    """Run ``run`` once for each configuration of ``configs`` that is not done yet, in order,
    in this process (:func:`winnow.experiments.parallel.run_parallel` runs them on several).

    For each configuration: a run already 'done' in ``store`` is skipped; otherwise it is
    claimed (:meth:`RunStore.claim`: a lease renewed while it executes),
    :meth:`RunStore.begin` starts (or restarts) it, ``run(run_obj)`` does the work and the
    run is marked done. Configurations with the same :func:`config_id` run once. A run that
    another process holds is left for later: the sweep comes back to it when the others are
    done and waits for it to end (skipped if it finished) or for the lease to expire.

    An exception marks the run 'failed' with a one-line error (its type and message) and a
    ``traceback.txt`` in the run directory; the sweep goes on, or re-raises with
    ``stop_on_error``. A ``KeyboardInterrupt`` (or ``SystemExit``) marks the run
    'interrupted' and is re-raised. Shows a progress bar over the runs unless ``progress`` is
    False.
    """
    unique = unique_configs(configs)
    summary = SweepSummary()
    pending = list(unique)
    held: dict[str, float] = {}  # run id -> when to try it again
    with SweepProgress(experiment, len(unique), progress) as bar:
        while pending or held:
            if not pending:  # only runs other processes hold: wait for the first to free
                time.sleep(max(0.0, min(held.values()) - time.monotonic()))
                pending = [r for r, at in held.items() if at <= time.monotonic()]
                for run_id in pending:
                    del held[run_id]
                continue
            run_id = pending.pop(0)
            claim = store.claim(experiment, run_id)
            if claim.state == "done":
                summary.skipped += 1
                bar.ended(run_id)
                continue
            if claim.lease is None:
                held[run_id] = time.monotonic() + claim.wait_seconds(store.lease_seconds)
                bar.show(waiting=len(held))
                continue
            bar.show(running=1, waiting=len(held))
            with claim.lease:
                error, err = execute_run(store, experiment, unique[run_id], run)
            bar.show(running=0)
            if err is not None:
                summary.failed.append((run_id, error))
                bar.ended(run_id, error)
                if stop_on_error:
                    raise err
            else:
                summary.ran += 1
                bar.ended(run_id)
    return summary
