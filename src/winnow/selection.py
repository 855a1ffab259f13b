"""Selection: from scores to masks (how many weights to keep, and where).

Every function here takes *density* (the fraction kept, in [0, 1]) and returns
:class:`~winnow.masks.Masks`. Scores follow winnow's convention: higher = more important = kept.

- :func:`select` keeps the top-k scores globally (one threshold for the whole model) or per
  layer (the same density in every tensor, or a density per tensor), among the weights still
  alive in ``current``; ties are broken by position, so the result has exactly k weights and is
  deterministic. A guard keeps at least ``min_per_layer`` weights in every tensor.
- :func:`exponential_densities` is the iterative schedule d^(k/n) of SynFlow and the
  lottery-ticket literature.

Finding the global threshold must not dominate an iterative method's cost (the reference
SynFlow code spends two thirds of its 100-round loop in a global ``kthvalue``). winnow never
sorts the scores of a large model: a seeded, stratified sample brackets the threshold and one
vectorised pass over the scores finds the few inside the bracket, among which the threshold is
found exactly (:func:`_kth_largest`); and :class:`Survivors` keeps the alive weights as lists
of storage positions, so each round of iterative pruning reads, ranks and compacts the
survivors only. The passes are compiled loops (:mod:`winnow._kernels`, numba) that release
the GIL and run in parallel parts (numba threads within an array, or tensors side by side).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from winnow import _kernels
from winnow.masks import Masks

SCOPES = ("global", "layer")


def check_density(density: float, what: str = "density") -> float:
    """``density`` as a float, or ``ValueError`` if it is not in [0, 1]."""
    value = float(density)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{what} must be in [0, 1] (the fraction kept), got {density!r}")
    return value


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float, or ``ValueError`` if it is not in [0, 1)."""
    value = float(sparsity)
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise ValueError(f"sparsity must be in [0, 1) (the fraction removed), got {sparsity!r}")
    return value


EXACT_BELOW = 1 << 16
"""Below this many candidates the threshold is found exactly by a partition of all of them."""
SAMPLE_SIZE = 1 << 14


T = TypeVar("T")

Rank = Callable[[np.ndarray], np.ndarray]
"""Positions (in increasing order) in an array of candidates -> keys in the order ties are
broken (lowest first)."""


def _sample_positions(m: int, k: int) -> np.ndarray:
    """A seeded, stratified sample of positions in [0, m): one at random in each of up to
    ``SAMPLE_SIZE`` equal strata, so it comes sorted (cheap to read) and its quantiles vary no
    more than those of a simple random sample."""
    size = min(SAMPLE_SIZE, max(m // 16, 1))
    step = m / size
    rng = np.random.default_rng(m ^ (k << 1))
    positions = (np.arange(size) + rng.random(size)) * step
    return np.minimum(positions.astype(np.int64), m - 1)


def _bracket(sample: np.ndarray, k: int, m: int) -> tuple[np.generic, np.generic]:
    """Two quantiles of a sample of m values that hold the k-th largest of the m between
    them with high probability (4 standard deviations of the sampling error on each side)."""
    fraction_above = k / m
    rank = sample.size * (1 - fraction_above)
    margin = 4 * math.sqrt(sample.size * fraction_above * (1 - fraction_above)) + 8
    ends = sorted({max(int(rank - margin), 0), min(int(rank + margin), sample.size - 1)})
    sample.partition(ends)
    return sample[ends[0]], sample[ends[-1]]


def _kth_largest(values: np.ndarray, k: int) -> tuple[np.generic, int, np.ndarray]:
    """The k-th largest entry t (1-based, 1 <= k <= len) of a 1-D array, exactly; how many
    entries are greater than t; and the positions of those equal to t, in order.

    Large arrays are never sorted: a sample brackets the answer (:func:`_bracket`); one pass
    counts the values above the bracket and finds the few inside it, and the answer is found
    among those by a partition. If the bracket misses (rare), all values are partitioned
    instead.
    """
    m = values.size
    if m > EXACT_BELOW:
        above, band = _band(values, *_bracket(values[_sample_positions(m, k)], k, m))
        need, inside = k - above, band.size
        if 0 < need <= inside:
            candidates = values[band]
            threshold = np.partition(candidates, inside - need)[inside - need]
            greater = above + int(np.count_nonzero(candidates > threshold))
            return threshold, greater, band[candidates == threshold]
    threshold = np.partition(values, m - k)[m - k]
    return threshold, int(np.count_nonzero(values > threshold)), np.flatnonzero(values == threshold)


def _band(values: np.ndarray, low: np.generic, high: np.generic) -> tuple[int, np.ndarray]:
    """How many values are above ``high``, and the positions of those in [low, high]."""
    words = -(-values.size // 8)
    scratch = getattr(_LOCAL, "inside", None)
    if scratch is None or scratch.size < 8 * words:
        scratch = _LOCAL.inside = _touched(8 * words, bool)
    inside = scratch[: 8 * words]
    inside[values.size :] = False
    parts = _workers()
    word_bounds = np.arange(parts + 1) * words // parts
    counts = np.empty((word_bounds.size - 1, 2), dtype=np.int64)
    _kernels.band(values, low, high, inside, np.minimum(8 * word_bounds, values.size), counts)
    starts = np.cumsum(counts[:, 1]) - counts[:, 1]
    positions = np.empty(int(counts[:, 1].sum()), dtype=np.intp)
    _kernels.flagged(inside, inside.view(np.uint64), word_bounds, starts, positions)
    return int(counts[:, 0].sum()), positions


_LOCAL = threading.local()
"""Per-thread scratch (the band's flags), kept from call to call."""


def _touched(size: int, dtype: type) -> np.ndarray:
    """A new array whose pages are already mapped: first writes to fresh memory from several
    threads at once were 10x slower here (page faults contend; numpy asks for huge pages)."""
    array = np.empty(size, dtype=dtype)
    array.fill(0)
    return array


def _workers() -> int:
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
    jobs: Sequence[tuple[int, Callable[[], T]]], parallel_above: int = PARALLEL_ABOVE
) -> list[T]:
    """Run ``(cost, job)`` pairs, in groups of about equal total cost on as many threads as
    :func:`_workers` allows (the compiled passes release the GIL), or in the calling thread
    when the costs add up to less than ``parallel_above``; results in the jobs' order."""
    global _POOL
    workers = _workers()
    if workers == 1 or sum(cost for cost, _ in jobs) < parallel_above or len(jobs) < 2:
        return [job() for _, job in jobs]
    groups: list[list[int]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for i in sorted(range(len(jobs)), key=lambda i: -jobs[i][0]):
        lightest = loads.index(min(loads))
        groups[lightest].append(i)
        loads[lightest] += jobs[i][0]
    if _POOL is None or _POOL[0] < workers - 1:
        _POOL = workers - 1, ThreadPoolExecutor(workers - 1, thread_name_prefix="winnow")
    results: list = [None] * len(jobs)

    def run(group: list[int]) -> None:
        for i in group:
            results[i] = jobs[i][1]()

    pending = [_POOL[1].submit(run, g) for g in groups[1:] if g]
    run(groups[0])
    for future in pending:
        future.result()
    return results


Cut = tuple[np.generic, "np.ndarray | None"]
"""Where a top-k ends: (threshold, tied), keeping the entries above the threshold and, of
those equal to it, all (``tied`` is ``None``) or those at the sorted positions ``tied``."""


def _cut(values: np.ndarray, k: int, rank: Rank | None = None) -> Cut:
    """The cut that keeps exactly the k largest entries of ``values``: ties are broken by
    position (the earlier entry is kept), or by ``rank`` of the positions when given."""
    if k <= 0:
        return values.dtype.type(np.inf), _NONE
    if k >= values.size:
        return values.dtype.type(-np.inf), None
    threshold, greater, ties = _kth_largest(values, k)
    missing = k - greater
    if missing == ties.size:
        return threshold, None
    if rank is None:
        return threshold, ties[:missing]
    keys = rank(ties)  # unique: exactly `missing` are at or below the missing-th smallest
    return threshold, ties[keys <= np.partition(keys, missing - 1)[missing - 1]]


def _flags(values: np.ndarray, cut: Cut) -> np.ndarray:
    """Boolean flags of the entries a cut keeps."""
    threshold, tied = cut
    if tied is None:
        return values >= threshold
    keep = values > threshold
    keep[tied] = True
    return keep


def _keep_top(values: np.ndarray, k: int, rank: Rank | None = None) -> np.ndarray:
    """Boolean flags of the k largest entries of ``values``, exactly k of them: ties are broken
    by position (the earlier entry is kept), or by ``rank`` of the positions when given."""
    return _flags(values, _cut(values, k, rank))


class AbsProductScores(Mapping[str, Tensor]):
    """Scores of the form ``|a ⊙ b|`` per tensor (SynFlow's ``|θ ⊙ ∂R/∂θ|``), formed only where
    they are read.

    Indexing forms the dense tensor, as torch computes it; :class:`Survivors` compute the
    product at the alive weights only, in the same floating-point arithmetic, instead of
    forming it for every weight each round. The factors are held, not copied: read the scores
    before changing them.
    """

    def __init__(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        self.factors = dict(factors)

    def __getitem__(self, name: str) -> Tensor:
        a, b = self.factors[name]
        return (a * b).abs_()

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)


def _factors(scores: Mapping[str, Tensor], name: str) -> tuple[Tensor, ...]:
    if isinstance(scores, AbsProductScores):
        return scores.factors[name]
    return (scores[name],)


def _float_dtype(scores: Mapping[str, Tensor]) -> torch.dtype:
    """float64 if any score is float64, else float32 (numpy has no bfloat16)."""
    wide = any(t.dtype == torch.float64 for n in scores for t in _factors(scores, n))
    return torch.float64 if wide else torch.float32


class Survivors:
    """The weights still alive while pruning, and exact top-k selection among them.

    Per tensor, the alive entries are held as their sorted positions in the storage of the
    scores (``None`` while all are alive; ``strides[name]`` is the layout they refer to,
    channels-last for SynFlow's convolutions), so a round of iterative pruning reads, ranks and
    compacts only the weights still alive, each in one compiled pass: over SynFlow's 100
    rounds to 1% density the alive weights add up to about 21 times the model's, instead of
    100 times. Ties are broken by the flat index in the default layout whatever the storage
    order. :func:`select` is one round of this.

    Args:
        shapes: parameter name -> shape, in the order ties are broken (first tensor first).
        current: masks of the weights alive at the start (default: all).
    """

    def __init__(
        self, shapes: Mapping[str, Sequence[int]], current: Mapping[str, Tensor] | None = None
    ) -> None:
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        if not self.shapes:
            raise ValueError("no scores to select from")
        if current is not None and set(current) != set(self.shapes):
            raise ValueError("scores and current masks cover different parameters")
        self.strides = {n: _contiguous_stride(s) for n, s in self.shapes.items()}
        self.index: dict[str, np.ndarray | None] = {}
        self._scratch: np.ndarray | None = None
        self._removed: np.ndarray | None = None
        for name, shape in self.shapes.items():
            if current is None:
                self.index[name] = None
                continue
            alive = current[name]
            if alive.shape != shape:
                raise ValueError(
                    f"scores for {name!r} have shape {tuple(shape)}, the mask has "
                    f"{tuple(alive.shape)}"
                )
            flat = np.flatnonzero(alive.detach().reshape(-1).cpu().numpy())
            self.index[name] = flat.astype(_index_dtype(shape.numel()))

    def counts(self) -> dict[str, int]:
        """Weights alive per tensor."""
        return {
            n: self.shapes[n].numel() if i is None else int(i.size) for n, i in self.index.items()
        }

    def select(
        self,
        scores: Mapping[str, Tensor],
        density: float | Mapping[str, float],
        scope: str = "global",
        min_per_layer: int = 0,
    ) -> dict[str, Tensor]:
        """Keep the top ``round(density * n)`` alive weights, exactly as :func:`select`.

        The others are removed from the survivors; returns, per tensor, the weights just
        removed as int64 positions (on the CPU) in the storage of a tensor laid out with
        ``strides[name]`` (:func:`flat_indices` turns them into flat indices).
        """
        cuts = self._decide(scores, density, scope, min_per_layer)
        # the removed positions are written to scratch, reused from round to round, then copied
        # out (few): fresh pages per round cost more than the copies
        alive = sum(values.size for values, _ in cuts.values())
        if self._removed is None or self._removed.size < alive:
            self._removed = np.empty(alive, dtype=np.int64)  # only its first pages are written
        jobs, outputs, start = [], {}, 0
        for name, (values, (threshold, tied)) in cuts.items():
            index = self.index[name]
            dense = index is None
            kept = _touched(values.size, _index_dtype(values.size)) if dense else index
            gone = self._removed[start : start + values.size]
            start += values.size
            outputs[name] = kept, gone
            arguments = (
                values, threshold, _NONE if tied is None else tied, tied is None,
                _ALL if dense else index, dense, kept, gone,
            )  # fmt: skip
            jobs.append((values.size, functools.partial(_kernels.compact, *arguments)))
        removed = {}
        for (name, (kept, gone)), (count, dropped) in zip(
            outputs.items(), run_balanced(jobs), strict=True
        ):
            if not (self.index[name] is None and dropped == 0):
                self.index[name] = kept[:count]
            removed[name] = torch.from_numpy(gone[:dropped].copy())
        return removed

    def choose(
        self,
        scores: Mapping[str, Tensor],
        density: float | Mapping[str, float],
        scope: str = "global",
        min_per_layer: int = 0,
    ) -> dict[str, np.ndarray]:
        """Which alive weights :meth:`select` would keep, as boolean flags per tensor (one per
        alive weight, in the order of ``index[name]``); the set of survivors is not changed
        (their positions follow the layout of ``scores``)."""
        return {
            n: _flags(values, cut)
            for n, (values, cut) in self._decide(scores, density, scope, min_per_layer).items()
        }

    def _decide(
        self,
        scores: Mapping[str, Tensor],
        density: float | Mapping[str, float],
        scope: str,
        min_per_layer: int,
    ) -> dict[str, tuple[np.ndarray, Cut]]:
        """Per tensor, the alive weights' scores (in the order of ``index[name]``) and the cut
        that keeps the chosen ones."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
        if set(scores) != set(self.shapes):
            raise ValueError("scores and current masks cover different parameters")
        if min_per_layer < 0:
            raise ValueError(f"min_per_layer must be >= 0, got {min_per_layer}")
        layered = isinstance(density, Mapping) or scope == "layer"
        if isinstance(density, Mapping):
            missing = set(self.shapes) - set(density)
            if missing:
                raise ValueError(f"no density given for {sorted(missing)[:3]}")
            fractions = {n: check_density(density[n], f"density of {n}") for n in self.shapes}
        else:
            fractions = dict.fromkeys(self.shapes, check_density(density))
        dtype = _float_dtype(scores)
        counts = list(self.counts().values())
        ends = np.cumsum(counts)
        starts, alive = ends - counts, int(ends[-1])
        total = sum(s.numel() for s in self.shapes.values())
        k = round(fractions[next(iter(self.shapes))] * total)  # the global k
        if not layered:
            _check_alive(k, alive, "the model")
        # one buffer for all the alive scores, reused from round to round
        buffer = self._buffer(alive, np.float64 if dtype == torch.float64 else np.float32)
        values = {n: buffer[a:b] for n, a, b in zip(self.shapes, starts, ends, strict=True)}
        for job in [self._gather(n, scores, dtype, v) for n, v in values.items()]:
            job()  # each in parallel parts
        ranks = {n: self._rank(n) for n in self.shapes}
        if layered:
            cuts = {}
            for (name, shape), count in zip(self.shapes.items(), counts, strict=True):
                k = max(round(fractions[name] * shape.numel()), min(min_per_layer, count))
                _check_alive(k, count, repr(name))
                cuts[name] = values[name], _cut(values[name], k, ranks[name])
            return cuts
        if min_per_layer:  # flags are the cut at 0 of themselves as 0/1 values
            flags = self._keep_guarded(values, k, min_per_layer, ranks)
            return {n: (f.view(np.uint8), (np.uint8(0), _NONE)) for n, f in flags.items()}
        rank = _concatenated_rank(counts, list(ranks.values()), self._bases())
        threshold, tied = _cut(buffer, k, rank)
        cuts = {}
        for name, start, end in zip(self.shapes, starts, ends, strict=True):
            if tied is not None:
                lo, hi = np.searchsorted(tied, [start, end])
                cuts[name] = values[name], (threshold, tied[lo:hi] - start)
            else:
                cuts[name] = values[name], (threshold, None)
        return cuts

    def _keep_guarded(
        self,
        values: dict[str, np.ndarray],
        k: int,
        min_per_layer: int,
        ranks: dict[str, Rank | None],
    ) -> dict[str, np.ndarray]:
        """Global top-k with a guard: each tensor's best ``min_per_layer`` first (they count
        towards k), then the best of the rest."""
        reserved = {
            n: _keep_top(v, min(min_per_layer, v.size), ranks[n]) for n, v in values.items()
        }
        k = max(k - sum(int(np.count_nonzero(r)) for r in reserved.values()), 0)
        others = {n: np.flatnonzero(~r) for n, r in reserved.items()}
        rest = np.concatenate([values[n][at] for n, at in others.items()])
        sizes = [at.size for at in others.values()]
        rest_ranks = [
            None if ranks[n] is None else _composed(ranks[n], at) for n, at in others.items()
        ]
        picks = _keep_top(rest, k, _concatenated_rank(sizes, rest_ranks, self._bases()))
        for flags, pick in zip(
            reserved.values(), np.split(picks, np.cumsum(sizes)[:-1]), strict=True
        ):
            flags[~flags] = pick
        return reserved

    def _gather(
        self, name: str, scores: Mapping[str, Tensor], dtype: torch.dtype, out: np.ndarray
    ) -> Callable[[], None]:
        """The job that writes the scores of ``name``'s alive weights to ``out``, in the order
        of ``index[name]``, NaN and -inf as the lowest finite value, +inf as the largest (the
        shapes are checked and the layout of the positions settled before it is returned)."""
        factors = _factors(scores, name)
        for tensor in factors:
            if tensor.shape != self.shapes[name]:
                raise ValueError(
                    f"scores for {name!r} have shape {tuple(tensor.shape)}, expected "
                    f"{tuple(self.shapes[name])}"
                )
        if len(factors) > 1 and any(t.dtype != dtype for t in factors):
            factors = (scores[name],)  # the product in the factors' own dtype, as torch forms it
        tensors = [t.detach().to("cpu", dtype) for t in factors]
        if len({t.stride() for t in tensors}) > 1 or not all(map(dense_layout, tensors)):
            tensors = [t.contiguous() for t in tensors]
        self._relayout(name, tensors[0].stride())
        flats = [t.as_strided((t.numel(),), (1,)).numpy() for t in tensors]
        info = np.finfo(out.dtype)
        low, high = out.dtype.type(info.min), out.dtype.type(info.max)
        index = self.index[name]
        positions = _ALL if index is None else index
        return functools.partial(
            _kernels.gather, flats[0], flats[-1], len(flats) > 1, positions, index is None,
            low, high, out, _workers(),
        )  # fmt: skip

    def _relayout(self, name: str, stride: tuple[int, ...]) -> None:
        """Make ``index[name]`` refer to storage laid out with ``stride`` (sorted again)."""
        old = self.strides[name]
        if stride == old:
            return
        index = self.index[name]
        if index is not None:
            flat = flat_indices(index, self.shapes[name], old)
            self.index[name] = np.sort(storage_offsets(flat, self.shapes[name], stride))
        self.strides[name] = stride

    def _rank(self, name: str) -> Rank | None:
        """Tie order among ``name``'s alive weights (positions in ``index[name]``): the flat
        index; ``None`` when the storage order is already that."""
        shape, stride = self.shapes[name], self.strides[name]
        if stride == _contiguous_stride(shape):
            return None
        index = self.index[name]
        return lambda at: flat_indices(at if index is None else index[at], shape, stride)

    def _bases(self) -> list[int]:
        """Offsets that put each tensor's tie keys after the previous tensor's."""
        return list(np.cumsum([0] + [s.numel() for s in self.shapes.values()])[:-1])

    def _buffer(self, size: int, dtype: type) -> np.ndarray:
        """Scratch space for the alive scores, reused from round to round (fresh pages of a new
        array cost a page fault each)."""
        if self._scratch is None or self._scratch.dtype != dtype or self._scratch.size < size:
            self._scratch = _touched(size, dtype)
        return self._scratch[:size]

    def masks(
        self,
        devices: Mapping[str, torch.device] | None = None,
        keep: Mapping[str, np.ndarray] | None = None,
    ) -> Masks:
        """The alive weights as boolean masks (on ``devices[name]``, default the CPU); with
        ``keep`` (from :meth:`choose`), only those of them it flags."""
        out = {}
        for name, shape in self.shapes.items():
            index = self.index[name]
            flags = None if keep is None else keep[name]
            if index is None:
                full = np.ones(shape.numel(), dtype=bool) if flags is None else flags
                mask = torch.from_numpy(full).as_strided(shape, self.strides[name]).contiguous()
            else:  # set the flat indices of the few alive: no copy out of another layout
                alive = index if flags is None else index[flags]
                full = np.zeros(shape.numel(), dtype=bool)
                full[flat_indices(alive, shape, self.strides[name])] = True
                mask = torch.from_numpy(full).view(shape)
            out[name] = mask.to(devices[name]) if devices is not None else mask
        return Masks(out)


_ALL = np.empty(0, dtype=np.int32)
"""The positions argument of a kernel told that every position is alive."""
_NONE = np.empty(0, dtype=np.intp)
"""No position."""


def _composed(rank: Rank, where: np.ndarray) -> Rank:
    return lambda at: rank(where[at])


def _concatenated_rank(
    sizes: Sequence[int], ranks: Sequence[Rank | None], bases: Sequence[int]
) -> Rank | None:
    """Tie order over segments laid end to end: segment by segment (keys from ``bases``), then
    each one's own ``rank`` (``None``: its positions are already in order)."""
    if all(r is None for r in ranks):
        return None
    ends = np.cumsum(sizes)

    def rank(at: np.ndarray) -> np.ndarray:
        keys = np.empty(at.size, dtype=np.int64)
        cuts = np.searchsorted(at, ends)  # `at` is in increasing order
        for segment, (lo, hi) in enumerate(itertools.pairwise([0, *cuts])):
            if lo < hi:
                local = at[lo:hi] - (ends[segment] - sizes[segment])
                own = ranks[segment]
                keys[lo:hi] = bases[segment] + (local if own is None else own(local))
        return keys

    return rank


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(tuple(shape)):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def dense_layout(tensor: Tensor) -> bool:
    """Whether ``tensor`` fills its storage without gaps: the default layout or a permutation
    of its dimensions (channels-last)."""
    if tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last):
        return True
    dims = sorted((d for d in range(tensor.dim()) if tensor.shape[d] > 1), key=tensor.stride)
    step = 1
    for d in dims:
        if tensor.stride(d) != step:
            return False
        step *= tensor.shape[d]
    return True


def storage_offsets(flat: np.ndarray, shape: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """Where the entries at ``flat`` (indices in the default row-major order) lie in the
    storage of a dense tensor of ``shape`` and ``stride`` (e.g. channels-last)."""
    numel = math.prod(shape)
    dtype = flat.dtype if flat.dtype == np.int32 else np.int64
    if flat.size * 8 > numel:  # many: read them off the map of every position
        every = torch.arange(numel, dtype=torch.int32 if dtype == np.int32 else torch.int64)
        table = every.as_strided(tuple(shape), tuple(stride)).reshape(-1).numpy()
        return np.take(table, flat)
    offsets = np.zeros(flat.shape, dtype=np.int64)
    for coord, step in zip(np.unravel_index(flat, tuple(shape)), stride, strict=True):
        offsets += coord.astype(np.int64) * step
    return offsets.astype(dtype)


def flat_indices(positions: np.ndarray, shape: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """The inverse of :func:`storage_offsets`: the flat indices (default row-major order) of
    the entries at ``positions`` in the storage of a dense tensor of ``shape`` and ``stride``."""
    shape, stride = tuple(shape), tuple(stride)
    steps = _contiguous_stride(shape)
    if stride == steps:
        return positions
    dims = sorted((d for d in range(len(shape)) if shape[d] > 1), key=lambda d: -stride[d])
    out = np.empty(positions.shape, dtype=positions.dtype)
    _kernels.flat_indices(
        positions,
        np.array([stride[d] for d in dims], dtype=np.int64),
        np.array([steps[d] for d in dims], dtype=np.int64),
        out,
    )
    return out


def _index_dtype(size: int) -> type:
    """int32 positions where they fit: half the memory traffic of int64."""
    return np.int32 if size < 2**31 else np.int64


def select(
    scores: Mapping[str, Tensor],
    density: float | Mapping[str, float],
    scope: str = "global",
    current: Masks | None = None,
    min_per_layer: int = 0,
) -> Masks:
    """Keep the highest-scoring weights: the top ``round(density * n)`` of them.

    Args:
        scores: parameter name -> scores (higher = keep), any float dtype.
        density: the fraction of all weights to keep, in [0, 1] (relative to the whole tensor
            or model, not to the weights still alive); or a mapping name -> density, which
            implies per-layer selection (e.g. to give a random mask the per-layer densities of
            another mask).
        scope: ``"global"`` (one threshold across all tensors) or ``"layer"`` (each tensor
            keeps its own fraction).
        current: weights already pruned stay pruned (iterative pruning). ``ValueError`` if the
            density asks for more weights than are alive.
        min_per_layer: keep at least this many weights in every tensor (a guard against layer
            collapse); they count towards the total.

    The masks are on the devices of the scores. Ties are broken by position: the first tensor
    first, then the flat index. NaN and -inf scores rank below every finite score.
    """
    survivors = Survivors({n: _factors(scores, n)[0].shape for n in scores}, current)
    keep = survivors.choose(scores, density, scope=scope, min_per_layer=min_per_layer)
    devices = {n: _factors(scores, n)[0].device for n in scores}
    return survivors.masks(devices, keep)


def _check_alive(k: int, alive: int, what: str) -> None:
    if k > alive:
        raise ValueError(
            f"cannot keep {k} weights of {what}: only {alive} are still alive (a density above "
            "the current mask's)"
        )


def exponential_densities(density: float, rounds: int) -> list[float]:
    """The densities d^(k/n) for k = 1..n (SynFlow's schedule; the last one is d)."""
    check_density(density)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [density ** (k / rounds) for k in range(1, rounds + 1)]


GROUPS = ("filter", "neuron", "channel")
"""Structured groups: ``filter`` / ``neuron`` = an output unit (dim 0 of the weight: a conv
filter, a row of a Linear weight); ``channel`` = an input unit (dim 1: an input channel of a
conv, a column of a Linear weight). ``(rows, cols)`` blocks are also accepted."""


def group_view(weight_like: Tensor, group: str | tuple[int, int]) -> Tensor:
    """``weight_like`` as (groups, members): one row per structured group (see :data:`GROUPS`).

    A block group ``(r, c)`` tiles the weight viewed as (out, in·kernel) with r x c blocks
    (both sizes must divide it).
    """
    matrix = weight_like.reshape(weight_like.shape[0], -1)
    if group in ("filter", "neuron"):
        return matrix
    if group == "channel":
        if weight_like.dim() < 2:
            raise ValueError("a 1-D tensor has no input channels")
        return weight_like.transpose(0, 1).reshape(weight_like.shape[1], -1)
    if isinstance(group, tuple) and len(group) == 2:
        r, c = group
        rows, cols = matrix.shape
        if r < 1 or c < 1 or rows % r or cols % c:
            raise ValueError(f"block {group} does not tile a {rows}x{cols} weight")
        return matrix.reshape(rows // r, r, cols // c, c).permute(0, 2, 1, 3).reshape(-1, r * c)
    raise ValueError(f"unknown group {group!r}; choose one of {GROUPS} or (rows, cols)")


def _ungroup(values: Tensor, like: Tensor, group: str | tuple[int, int]) -> Tensor:
    """Inverse of :func:`group_view` for a (groups, members) tensor."""
    if group in ("filter", "neuron"):
        return values.reshape(like.shape)
    if group == "channel":
        shape = (like.shape[1], like.shape[0], *like.shape[2:])
        return values.reshape(shape).transpose(0, 1).reshape(like.shape)
    r, c = group
    rows, cols = like.shape[0], like.numel() // like.shape[0]
    blocks = values.reshape(rows // r, cols // c, r, c).permute(0, 2, 1, 3)
    return blocks.reshape(like.shape)


def select_groups(
    scores: Mapping[str, Tensor],
    density: float,
    group: str | tuple[int, int] = "filter",
    scope: str = "layer",
    reduce: str = "mean",
    exclude: tuple[str, ...] = (),
) -> Masks:
    """Structured selection: keep or remove whole groups (filters, channels, neurons, blocks).

    Each group's score is the ``reduce`` ("mean", "sum", "l2" = root of the sum of squares,
    "max") of its members' scores: with magnitude scores, "sum" is the L1 norm of a filter
    (Li et al. 2017) and "l2" its L2 norm. ``scope="layer"`` keeps round(``density`` · groups)
    groups of every tensor; ``"global"`` ranks all groups by score and keeps the best until
    ``density`` of all the weights are kept (use "mean" so groups of different sizes compare).
    Tensors named in ``exclude`` (typically the output layer) are kept whole. ``density`` is
    the fraction kept.
    """
    check_density(density)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
    reducers = {
        "mean": lambda g: g.mean(1),
        "sum": lambda g: g.sum(1),
        "l2": lambda g: g.pow(2).sum(1).sqrt(),
        "max": lambda g: g.amax(1),
    }
    if reduce not in reducers:
        raise ValueError(f"unknown reduce {reduce!r}; choose one of {sorted(reducers)}")
    unknown = set(exclude) - set(scores)
    if unknown:
        raise ValueError(f"cannot exclude unknown tensors {sorted(unknown)}")
    grouped = {
        n: reducers[reduce](group_view(s.detach().double(), group))
        for n, s in scores.items()
        if n not in exclude
    }
    if not grouped:
        raise ValueError("every tensor is excluded: nothing to select from")
    keep: dict[str, Tensor] = {}
    if scope == "layer":
        for name, values in grouped.items():
            k = round(density * len(values))
            chosen = torch.zeros(len(values), dtype=torch.bool, device=values.device)
            chosen[torch.argsort(values, descending=True, stable=True)[:k]] = True
            keep[name] = chosen
    else:
        names = list(grouped)
        values = torch.cat([grouped[n].cpu() for n in names])
        sizes = torch.cat(
            [torch.full((len(grouped[n]),), scores[n].numel() // len(grouped[n])) for n in names]
        )
        order = torch.argsort(values, descending=True, stable=True)
        target = density * sum(scores[n].numel() for n in names)
        count = int(torch.searchsorted(sizes[order].cumsum(0).double(), target - 0.5)) + 1
        count = min(count, len(values)) if target > 0 else 0
        chosen = torch.zeros(len(values), dtype=torch.bool)
        chosen[order[:count]] = True
        start = 0
        for name in names:
            size = len(grouped[name])
            keep[name] = chosen[start : start + size].to(grouped[name].device)
            start += size
    out = {}
    for name, s in scores.items():
        if name in exclude:
            out[name] = torch.ones_like(s, dtype=torch.bool)
            continue
        members = group_view(s, group).shape[1]
        out[name] = _ungroup(keep[name].unsqueeze(1).expand(-1, members), s, group).contiguous()
    return Masks(out)
