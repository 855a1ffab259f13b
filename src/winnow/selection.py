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
sorts the scores of a large model: a seeded sample brackets the threshold and one pass over
the scores finds it exactly (:func:`_kth_largest`); and :class:`Survivors` keeps the alive
weights as index lists, so each round of iterative pruning works on the survivors only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

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


EXACT_BELOW = 1 << 20
"""Below this many candidates the threshold is found exactly by a partition of all of them."""
SAMPLE_SIZE = 1 << 16


def _kth_largest(values: np.ndarray, k: int) -> tuple[np.generic, np.ndarray | None]:
    """The k-th largest entry (1-based, 1 <= k <= len) of a 1-D array, exactly, and the
    positions of a band of entries that holds every entry equal to it (``None``: anywhere).

    Large arrays are never sorted: a seeded sample of 65,536 entries brackets the answer
    between two sample quantiles (4 standard deviations of the sampling error on each side);
    one pass counts the values above the bracket and another finds the few inside it, and the
    answer is found among those by a partition. If the bracket misses (rare), all values are
    partitioned instead.
    """
    m = values.size
    if m > EXACT_BELOW:
        rng = np.random.default_rng(m ^ (k << 1))
        sample = np.sort(values[rng.integers(0, m, SAMPLE_SIZE)])
        fraction_above = k / m
        rank = sample.size * (1 - fraction_above)
        margin = 4 * math.sqrt(sample.size * fraction_above * (1 - fraction_above)) + 8
        lo = sample[max(int(rank - margin), 0)]
        hi = sample[min(int(rank + margin), sample.size - 1)]
        need = k - int(np.count_nonzero(values > hi))
        band = np.flatnonzero((values >= lo) & (values <= hi))
        if 0 < need <= band.size:
            inside = values[band]
            return np.partition(inside, inside.size - need)[inside.size - need], band
    return np.partition(values, m - k)[m - k], None


def _keep_top(values: np.ndarray, k: int) -> np.ndarray:
    """Boolean flags of the k largest entries of ``values``; ties broken by position (the
    earlier entry is kept), so exactly k are chosen."""
    if k <= 0:
        return np.zeros(values.size, dtype=bool)
    if k >= values.size:
        return np.ones(values.size, dtype=bool)
    threshold, band = _kth_largest(values, k)
    keep = values > threshold
    missing = k - int(np.count_nonzero(keep))
    if missing > 0:
        if band is None:
            ties = np.flatnonzero(values == threshold)
        else:
            ties = band[values[band] == threshold]
        keep[ties[:missing]] = True
    return keep


def _float_dtype(scores: Mapping[str, Tensor]) -> torch.dtype:
    """float64 if any score is float64, else float32 (numpy has no bfloat16)."""
    wide = any(s.dtype == torch.float64 for s in scores.values())
    return torch.float64 if wide else torch.float32


def _finite(values: np.ndarray) -> np.ndarray:
    """NaN and -inf become the lowest finite value (kept only when nothing else is left), +inf
    the largest."""
    with np.errstate(invalid="ignore", over="ignore"):
        if np.isfinite(values.sum()):  # one cheap reduction proves there is nothing to replace
            return values
    info = np.finfo(values.dtype)
    return np.nan_to_num(values, nan=info.min, neginf=info.min, posinf=info.max)


class Survivors:
    """The weights still alive while pruning, and exact top-k selection among them.

    Per tensor, the alive entries are held as their sorted flat indices (``None`` while all are
    alive), so a round of iterative pruning costs time in proportion to the weights still
    alive, not to all of them: over SynFlow's 100 rounds to 1% density the alive weights add
    up to about 21 times the model's, instead of 100 times. :func:`select` is one round of
    this.

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
        self.index: dict[str, np.ndarray | None] = {}
        self._offsets: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}
        self.removed_offsets: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}
        self._scratch: np.ndarray | None = None
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

    def alive_values(
        self, name: str, scores: Tensor, dtype: torch.dtype, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The scores of ``name``'s alive weights, in position order, as a numpy array (written
        into ``out`` when given). NaN and infinities are not yet replaced.

        Scores in the channels-last layout are read through their storage, at offsets kept
        alongside the indices, rather than copied to the default layout each round.
        """
        if scores.shape != self.shapes[name]:
            raise ValueError(
                f"scores for {name!r} have shape {tuple(scores.shape)}, expected "
                f"{tuple(self.shapes[name])}"
            )
        index = self.index[name]
        values = scores.detach().to("cpu", dtype)
        if index is not None and _is_channels_last(values):
            cached = self._offsets.get(name)
            if cached is None or cached[0] != values.stride():
                offsets = storage_offsets(index, values.shape, values.stride())
                cached = self._offsets[name] = (values.stride(), offsets)
            flat, index = values.as_strided((values.numel(),), (1,)).numpy(), cached[1]
        else:
            flat = values.reshape(-1).numpy()
        if out is None:
            return flat if index is None else np.take(flat, index)
        if index is None:
            out[:] = flat
        else:
            np.take(flat, index, out=out, mode="clip")  # "raise" would buffer the output
        return out

    def select(
        self,
        scores: Mapping[str, Tensor],
        density: float | Mapping[str, float],
        scope: str = "global",
        min_per_layer: int = 0,
    ) -> dict[str, Tensor]:
        """Keep the top ``round(density * n)`` alive weights, exactly as :func:`select`.

        The others are removed from the survivors; returns, per tensor, the flat indices
        just removed (int64, on the CPU). For scores read through their storage (channels-last),
        ``removed_offsets[name]`` holds (stride, storage offsets) of the same weights.
        """
        keep = self.choose(scores, density, scope, min_per_layer)
        self.removed_offsets = {}
        removed = {}
        for name, chosen in keep.items():
            index = self.index[name]
            if index is None and chosen.all():
                removed[name] = torch.zeros(0, dtype=torch.int64)
                continue
            if index is None:
                index = np.arange(chosen.size, dtype=_index_dtype(chosen.size))
            dead = np.flatnonzero(~chosen)  # few: read them by position, not by mask
            removed[name] = torch.from_numpy(index[dead].astype(np.int64))
            self.index[name] = index[chosen]
            if name in self._offsets:
                stride, offsets = self._offsets[name]
                self.removed_offsets[name] = (stride, offsets[dead])
                self._offsets[name] = (stride, offsets[chosen])
        return removed

    def choose(
        self,
        scores: Mapping[str, Tensor],
        density: float | Mapping[str, float],
        scope: str = "global",
        min_per_layer: int = 0,
    ) -> dict[str, np.ndarray]:
        """Which alive weights :meth:`select` would keep, as boolean flags per tensor (one per
        alive weight, in position order); the survivors are not changed."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
        if set(scores) != set(self.shapes):
            raise ValueError("scores and current masks cover different parameters")
        if min_per_layer < 0:
            raise ValueError(f"min_per_layer must be >= 0, got {min_per_layer}")
        dtype = _float_dtype(scores)
        counts = self.counts()
        total = sum(s.numel() for s in self.shapes.values())
        if isinstance(density, Mapping) or scope == "layer":
            if isinstance(density, Mapping):
                missing = set(self.shapes) - set(density)
                if missing:
                    raise ValueError(f"no density given for {sorted(missing)[:3]}")
                fractions = {n: check_density(density[n], f"density of {n}") for n in self.shapes}
            else:
                fractions = dict.fromkeys(self.shapes, check_density(density))
            keep = {}
            for name, shape in self.shapes.items():
                k = max(round(fractions[name] * shape.numel()), min(min_per_layer, counts[name]))
                _check_alive(k, counts[name], repr(name))
                keep[name] = _keep_top(_finite(self.alive_values(name, scores[name], dtype)), k)
        elif min_per_layer:
            values = {n: _finite(self.alive_values(n, scores[n], dtype)) for n in self.shapes}
            keep = _keep_guarded(values, round(check_density(density) * total), min_per_layer)
        else:
            k = round(check_density(density) * total)
            _check_alive(k, sum(counts.values()), "the model")
            # one buffer for all the alive scores: no concatenation, one finiteness check
            ends = np.cumsum(list(counts.values()))
            buffer = self._buffer(
                int(ends[-1]), np.float64 if dtype == torch.float64 else np.float32
            )
            for name, start, end in zip(
                self.shapes, ends - list(counts.values()), ends, strict=True
            ):
                self.alive_values(name, scores[name], dtype, out=buffer[start:end])
            chosen = np.split(_keep_top(_finite(buffer), k), ends[:-1])
            keep = dict(zip(self.shapes, chosen, strict=True))
        return keep

    def _buffer(self, size: int, dtype: type) -> np.ndarray:
        """Scratch space for the alive scores, reused from round to round (fresh pages of a new
        array cost a page fault each)."""
        if self._scratch is None or self._scratch.dtype != dtype or self._scratch.size < size:
            self._scratch = np.empty(size, dtype=dtype)
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
            else:
                full = np.zeros(shape.numel(), dtype=bool)
                full[index if flags is None else index[flags]] = True
            mask = torch.from_numpy(full).reshape(shape)
            out[name] = mask.to(devices[name]) if devices is not None else mask
        return Masks(out)


def _keep_guarded(
    values: dict[str, np.ndarray], k: int, min_per_layer: int
) -> dict[str, np.ndarray]:
    """Global top-k with a guard: each tensor's best ``min_per_layer`` first (they count
    towards k), then the best of the rest."""
    _check_alive(k, sum(v.size for v in values.values()), "the model")
    reserved = {n: _keep_top(v, min(min_per_layer, v.size)) for n, v in values.items()}
    k = max(k - sum(int(np.count_nonzero(r)) for r in reserved.values()), 0)
    rest = np.concatenate([v[~reserved[n]] for n, v in values.items()])
    others = [int(np.count_nonzero(~r)) for r in reserved.values()]
    picks = np.split(_keep_top(rest, k), np.cumsum(others)[:-1])
    for flags, pick in zip(reserved.values(), picks, strict=True):
        flags[~flags] = pick
    return reserved


def _is_channels_last(tensor: Tensor) -> bool:
    return (
        tensor.dim() == 4
        and not tensor.is_contiguous()
        and tensor.is_contiguous(memory_format=torch.channels_last)
    )


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


def _index_dtype(size: int) -> type:
    """int32 flat indices where they fit: half the memory traffic of int64."""
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
    first, then the flat index.
    """
    survivors = Survivors({n: s.shape for n, s in scores.items()}, current)
    keep = survivors.choose(scores, density, scope=scope, min_per_layer=min_per_layer)
    return survivors.masks({n: s.device for n, s in scores.items()}, keep)


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
