"""Threads for the compiled passes of selection: how many, a pool, and a fork guard (private).

The passes of :mod:`winnow.core._topk` and the zeroing of removed weights release the GIL and
run in parallel parts: numba threads within an array, or tensors side by side on a thread
pool. A process forked after those threads started cannot start them again (GNU OpenMP
aborts there, and numba with it), so a forked child runs plain loops on a new pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def touched(size: int, dtype: type) -> np.ndarray:
    """A new array whose pages are already mapped: first writes to fresh memory from several
    threads at once were 10x slower here (page faults contend; numpy asks for huge pages)."""
    array = np.empty(size, dtype=dtype)
    array.fill(0)
    return array


def workers() -> int:
    """Parallel parts for the compiled passes: torch's intra-op thread count, at most 4
    (memory-bound passes gain little beyond); 1 in a process forked from one whose parallel
    passes had run (GNU OpenMP cannot start again there: numba would abort it)."""
    global _STARTED
    if _FORKED:
        return 1
    _STARTED = True
    return max(1, min(torch.get_num_threads(), 4))


_STARTED = False
"""Whether this process has run parallel passes (their threads and the pool exist)."""
_FORKED = False
"""Whether this process was forked from one that had."""


def _after_fork_in_child() -> None:
    global _FORKED, _POOL
    _FORKED = _FORKED or _STARTED
    _POOL = None  # its threads did not come along


os.register_at_fork(after_in_child=_after_fork_in_child)


PARALLEL_ABOVE = 1 << 18
"""Work (entries) below which the passes run in the calling thread."""

_POOL: tuple[int, ThreadPoolExecutor] | None = None
"""(threads, the pool that runs all but the first group of :func:`run_balanced`)."""


def run_balanced(
    jobs: Sequence[tuple[int, Callable[[], T]]], parallel_above: int | None = None
) -> list[T]:
    """Run ``(cost, job)`` pairs, in groups of about equal total cost on as many threads as
    :func:`workers` allows (the compiled passes release the GIL), or in the calling thread
    when the costs add up to less than ``parallel_above``; results in the jobs' order."""
    global _POOL
    if parallel_above is None:
        parallel_above = PARALLEL_ABOVE
    parts = workers()
    if parts == 1 or sum(cost for cost, _ in jobs) < parallel_above or len(jobs) < 2:
        return [job() for _, job in jobs]
    groups: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for i in sorted(range(len(jobs)), key=lambda i: -jobs[i][0]):
        lightest = loads.index(min(loads))
        groups[lightest].append(i)
        loads[lightest] += jobs[i][0]
    if _POOL is None or _POOL[0] < parts - 1:
        _POOL = parts - 1, ThreadPoolExecutor(parts - 1, thread_name_prefix="winnow")
    results: list = [None] * len(jobs)

    def run(group: list[int]) -> None:
        for i in group:
            results[i] = jobs[i][1]()

    pending = [_POOL[1].submit(run, g) for g in groups[1:] if g]
    run(groups[0])
    for future in pending:
        future.result()
    return results
