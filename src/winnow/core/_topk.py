"""Exact top-k among the weights still alive: the engine behind :func:`winnow.select` (private).

Finding the global threshold must not dominate an iterative method's cost (the reference
SynFlow code spends two thirds of its 100-round loop in a global ``kthvalue``). winnow never
sorts the scores of a large model: a seeded, stratified sample brackets the threshold and one
vectorised pass over the scores finds the few inside the bracket, among which the threshold is
found exactly (:func:`_kth_largest`); and :class:`Survivors` keeps the alive weights as lists
of storage positions, so each round of iterative pruning reads, ranks and compacts the
survivors only. The passes are compiled loops (:mod:`winnow.core._kernels`, numba, loaded on
first use) that release the GIL and run in parallel parts (:mod:`winnow.core._parallel`).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from winnow.core import _kernels, _parallel
from winnow.core._layout import (
    contiguous_stride,
    dense_layout,
    flat_indices,
    index_dtype,
    storage_offsets,
)
from winnow.core.densities import check_density, check_scope
from winnow.core.masks import Masks
from winnow.core.scores import (
    NonFiniteError,
    check_nonfinite,
    factors,
    float_dtype,
    nonfinite_message,
)

Rank = Callable[[np.ndarray], np.ndarray]
"""Positions (in increasing order) in an array of candidates -> keys in the order ties are
broken (lowest first)."""


EXACT_BELOW = 1 << 16
"""Below this many candidates the threshold is found exactly by a partition of all of them."""
SAMPLE_SIZE = 1 << 14


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
        scratch = _LOCAL.inside = _parallel.touched(8 * words, bool)
    inside = scratch[: 8 * words]
    inside[values.size :] = False
    parts = _parallel.workers()
    word_bounds = np.arange(parts + 1) * words // parts
    counts = np.empty((word_bounds.size - 1, 2), dtype=np.int64)
    _kernels.band(values, low, high, inside, np.minimum(8 * word_bounds, values.size), counts)
    starts = np.cumsum(counts[:, 1]) - counts[:, 1]
    positions = np.empty(int(counts[:, 1].sum()), dtype=np.intp)
    _kernels.flagged(inside, inside.view(np.uint64), word_bounds, starts, positions)
    return int(counts[:, 0].sum()), positions


_LOCAL = threading.local()
"""Per-thread scratch (the band's flags), kept from call to call."""


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
        self.strides = {n: contiguous_stride(s) for n, s in self.shapes.items()}
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
            self.index[name] = flat.astype(index_dtype(shape.numel()))

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
        nonfinite: str = "error",
    ) -> dict[str, Tensor]:
        """Keep the top ``round(density * n)`` alive weights, exactly as :func:`select`.

        The others are removed from the survivors; returns, per tensor, the weights just
        removed as int64 positions (on the CPU) in the storage of a tensor laid out with
        ``strides[name]`` (:func:`flat_indices` turns them into flat indices).
        """
        cuts = self._decide(scores, density, scope, min_per_layer, nonfinite)
        # the removed positions are written to scratch, reused from round to round, then copied
        # out (few): fresh pages per round cost more than the copies
        alive = sum(values.size for values, _ in cuts.values())
        if self._removed is None or self._removed.size < alive:
            self._removed = np.empty(alive, dtype=np.int64)  # only its first pages are written
        jobs, outputs, start = [], {}, 0
        for name, (values, (threshold, tied)) in cuts.items():
            index = self.index[name]
            dense = index is None
            kept = _parallel.touched(values.size, index_dtype(values.size)) if dense else index
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
            outputs.items(), _parallel.run_balanced(jobs), strict=True
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
        nonfinite: str = "error",
    ) -> dict[str, np.ndarray]:
        """Which alive weights :meth:`select` would keep, as boolean flags per tensor (one per
        alive weight, in the order of ``index[name]``); the set of survivors is not changed
        (their positions follow the layout of ``scores``)."""
        return {
            n: _flags(values, cut)
            for n, (values, cut) in self._decide(
                scores, density, scope, min_per_layer, nonfinite
            ).items()
        }

    def _decide(
        self,
        scores: Mapping[str, Tensor],
        density: float | Mapping[str, float],
        scope: str,
        min_per_layer: int,
        nonfinite: str,
    ) -> dict[str, tuple[np.ndarray, Cut]]:
        """Per tensor, the alive weights' scores (in the order of ``index[name]``) and the cut
        that keeps the chosen ones. Non-finite scores of alive weights raise
        :class:`NonFiniteError` unless ``nonfinite`` is "lowest"."""
        check_scope(scope)
        check_nonfinite(nonfinite)
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
        dtype = float_dtype(scores)
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
        jobs = {n: self._gather(n, scores, dtype, v) for n, v in values.items()}
        bad = {n: job() for n, job in jobs.items()}  # each in parallel parts
        if nonfinite == "error" and any(bad.values()):
            raise NonFiniteError(nonfinite_message(bad, "scores"))
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
        parts = factors(scores, name)
        for tensor in parts:
            if tensor.shape != self.shapes[name]:
                raise ValueError(
                    f"scores for {name!r} have shape {tuple(tensor.shape)}, expected "
                    f"{tuple(self.shapes[name])}"
                )
        if len(parts) > 1 and any(t.dtype != dtype for t in parts):
            parts = (scores[name],)  # the product in the factors' own dtype, as torch forms it
        tensors = [t.detach().to("cpu", dtype) for t in parts]
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
            low, high, out, _parallel.workers(),
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
        if stride == contiguous_stride(shape):
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
            self._scratch = _parallel.touched(size, dtype)
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


def _check_alive(k: int, alive: int, what: str) -> None:
    if k > alive:
        raise ValueError(
            f"cannot keep {k} weights of {what}: only {alive} are still alive (a density above "
            "the current mask's)"
        )


def zero_removed(
    params: dict[str, nn.Parameter],
    removed: dict[str, Tensor],
    strides: dict[str, tuple[int, ...]],
) -> None:
    """Zero the weights just pruned, leaving the others untouched: ``removed[name]`` are
    positions in the storage of a tensor laid out with ``strides[name]`` (see
    :meth:`Survivors.select`). On the CPU, tensors are zeroed side by side by a compiled
    scatter on the weights' bits (any float dtype)."""
    on_cpu = []
    with torch.no_grad():
        for name, where in removed.items():
            if not where.numel():
                continue
            param, stride = params[name], strides[name]
            if not dense_layout(param):
                flat = torch.from_numpy(flat_indices(where.numpy(), param.shape, stride))
                mask = torch.zeros(param.numel(), dtype=torch.bool)
                mask[flat] = True
                param.masked_fill_(mask.view(param.shape).to(param.device), 0)
                continue
            if param.stride() != stride:
                flat = flat_indices(where.numpy(), param.shape, stride)
                where = torch.from_numpy(storage_offsets(flat, param.shape, param.stride()))
            storage = param.detach().as_strided((param.numel(),), (1,))
            bits = _BITS.get(storage.element_size())
            if storage.device.type == "cpu" and bits is not None:  # 0.0 is all zero bits
                job = functools.partial(
                    _kernels.scatter_zero, storage.view(bits).numpy(), where.numpy()
                )
                on_cpu.append((where.numel(), job))
            else:
                storage.index_fill_(0, where.to(param.device, torch.int64), 0)
        _parallel.run_balanced(on_cpu, 1 << 14)  # each write waits on memory: tensors side by side


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Integer dtypes by width, to write zeros into any float storage (bfloat16 included)."""
