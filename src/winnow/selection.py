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
concatenates or sorts the scores of a large model: a seeded sample brackets the threshold and
one pass over the scores finds it exactly (:func:`_kth_largest`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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
"""Below this many candidates the threshold is found exactly by ``kthvalue`` on all of them."""
SAMPLE_SIZE = 1 << 16


def _count(mask: Tensor) -> int:
    return int(torch.count_nonzero(mask))  # much faster than bool.sum(), which widens to int64


def _kth_largest_exact(pieces: list[Tensor], alive: list[Tensor], k: int) -> float:
    flat = torch.cat([p[a].cpu() for p, a in zip(pieces, alive, strict=True)])
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


def _kth_largest(pieces: list[Tensor], alive: list[Tensor], k: int) -> float:
    """The k-th largest value (1-based) among the alive entries of several tensors, exactly.

    Large inputs are never concatenated or sorted: a seeded sample of about 65,536 alive
    entries brackets the answer between two sample quantiles (4 standard deviations of the
    sampling error on each side); one pass counts the values above the bracket and gathers the
    few inside it, and the answer is found among those. If the bracket misses (rare), the exact
    method runs instead.
    """
    counts = [_count(a) for a in alive]
    total = sum(counts)
    if total <= EXACT_BELOW:
        return _kth_largest_exact(pieces, alive, k)
    sizes = [p.numel() for p in pieces]
    draws = min(int(SAMPLE_SIZE * sum(sizes) / total) + 1, 64 * SAMPLE_SIZE)
    gen = torch.Generator().manual_seed(total ^ k)
    positions = torch.randint(sum(sizes), (draws,), generator=gen)
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    owner = torch.bucketize(positions, offsets[1:], right=True)
    drawn = []
    for i, (piece, keep) in enumerate(zip(pieces, alive, strict=True)):
        local = (positions[owner == i] - offsets[i]).to(piece.device)
        drawn.append(piece.flatten()[local][keep.flatten()[local]].cpu())
    sample = torch.cat(drawn).sort().values
    if sample.numel() < 1024:
        return _kth_largest_exact(pieces, alive, k)
    fraction_above = k / total
    rank = sample.numel() * (1 - fraction_above)
    margin = 4 * math.sqrt(sample.numel() * fraction_above * (1 - fraction_above)) + 8
    lo = float(sample[max(int(rank - margin), 0)])
    hi = float(sample[min(int(rank + margin), sample.numel() - 1)])
    above = sum(_count((p > hi).logical_and_(a)) for p, a in zip(pieces, alive, strict=True))
    band = torch.cat(
        [
            p[(p >= lo).logical_and_(p <= hi).logical_and_(a)].cpu()
            for p, a in zip(pieces, alive, strict=True)
        ]
    )
    need = k - above
    if need <= 0 or need > band.numel():
        return _kth_largest_exact(pieces, alive, k)
    return float(torch.kthvalue(band, band.numel() - need + 1).values)


def _top_k(pieces: list[Tensor], alive: list[Tensor], k: int) -> list[Tensor]:
    """Boolean masks (one per tensor) of the k largest alive entries of ``pieces`` together.

    Ties at the threshold are broken by position (first tensor first, then flat index), so
    exactly k entries are chosen; dead entries never are.
    """
    total = sum(_count(a) for a in alive)
    if k <= 0:
        return [torch.zeros_like(p, dtype=torch.bool) for p in pieces]
    if k > total:
        raise ValueError(f"cannot keep {k} of {total} weights")
    threshold = _kth_largest(pieces, alive, k)
    keep = [(p > threshold).logical_and_(a) for p, a in zip(pieces, alive, strict=True)]
    missing = k - sum(_count(m) for m in keep)
    for piece, live, chosen in zip(pieces, alive, keep, strict=True):
        if missing <= 0:
            break
        ties = torch.nonzero((piece == threshold).logical_and_(live).flatten()).flatten()
        ties = ties[:missing]
        chosen.view(-1)[ties] = True
        missing -= ties.numel()
    return keep


def _candidates(name: str, scores: Tensor, alive: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Scores in a common float dtype; NaN and -inf become the lowest finite value (kept only
    when nothing else is left)."""
    if alive is not None and alive.shape != scores.shape:
        raise ValueError(
            f"scores for {name!r} have shape {tuple(scores.shape)}, the mask has "
            f"{tuple(alive.shape)}"
        )
    lowest = torch.finfo(dtype).min
    return torch.nan_to_num(scores.detach().to(dtype), nan=lowest, neginf=lowest)


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
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
    if not scores:
        raise ValueError("no scores to select from")
    if current is not None and set(current) != set(scores):
        raise ValueError("scores and current masks cover different parameters")
    if min_per_layer < 0:
        raise ValueError(f"min_per_layer must be >= 0, got {min_per_layer}")
    dtype = torch.float32
    for values in scores.values():
        dtype = torch.promote_types(dtype, values.dtype if values.is_floating_point() else dtype)
    clean = {
        n: _candidates(n, s, None if current is None else current[n], dtype)
        for n, s in scores.items()
    }
    alive = {
        n: (
            current[n].to(s.device) if current is not None else torch.ones_like(s, dtype=torch.bool)
        )
        for n, s in clean.items()
    }

    if isinstance(density, Mapping):
        missing = set(clean) - set(density)
        if missing:
            raise ValueError(f"no density given for {sorted(missing)[:3]}")
        targets = {
            n: round(check_density(density[n], f"density of {n}") * s.numel())
            for n, s in clean.items()
        }
    elif scope == "layer":
        value = check_density(density)
        targets = {n: round(value * s.numel()) for n, s in clean.items()}
    else:
        value = check_density(density)
        total = sum(s.numel() for s in clean.values())
        return _global(clean, round(value * total), alive, min_per_layer)
    out = {}
    for name, values in clean.items():
        count = _count(alive[name])
        k = max(targets[name], min(min_per_layer, count))
        _check_alive(k, count, repr(name))
        out[name] = _top_k([values], [alive[name]], k)[0]
    return Masks(out)


def _check_alive(k: int, alive: int, what: str) -> None:
    if k > alive:
        raise ValueError(
            f"cannot keep {k} weights of {what}: only {alive} are still alive (a density above "
            "the current mask's)"
        )


def _global(
    clean: dict[str, Tensor], k: int, alive: dict[str, Tensor], min_per_layer: int
) -> Masks:
    _check_alive(k, sum(_count(a) for a in alive.values()), "the model")
    reserved = {}
    if min_per_layer:
        for name, values in clean.items():
            count = min(min_per_layer, _count(alive[name]))
            reserved[name] = _top_k([values], [alive[name]], count)[0]
            alive[name] = alive[name] & ~reserved[name]
        k = max(k - sum(_count(r) for r in reserved.values()), 0)
    keep = _top_k(list(clean.values()), list(alive.values()), k)
    return Masks(
        {
            name: chosen | reserved[name] if reserved else chosen
            for name, chosen in zip(clean, keep, strict=True)
        }
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
