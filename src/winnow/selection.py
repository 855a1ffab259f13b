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


def _kth_largest_exact(pieces: list[Tensor], k: int) -> float:
    flat = torch.cat([p.flatten() for p in pieces])
    return float(torch.kthvalue(flat.cpu(), flat.numel() - k + 1).values)


def _kth_largest(pieces: list[Tensor], k: int) -> float:
    """The k-th largest value (1-based) over several tensors, exactly.

    Large inputs are not concatenated or sorted: a seeded sample of 65,536 entries brackets the
    answer between two sample quantiles (4 standard deviations of the sampling error on each
    side), one pass counts the values above the bracket and gathers the few inside it, and the
    answer is found among those. If the bracket misses (rare), the exact method runs instead.
    """
    sizes = [p.numel() for p in pieces]
    total = sum(sizes)
    if total <= EXACT_BELOW:
        return _kth_largest_exact(pieces, k)
    gen = torch.Generator().manual_seed(total ^ k)
    positions = torch.randint(total, (SAMPLE_SIZE,), generator=gen)
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    owner = torch.bucketize(positions, offsets[1:], right=True)
    sample = (
        torch.cat(
            [
                pieces[i].flatten()[(positions[owner == i] - offsets[i]).to(pieces[i].device)].cpu()
                for i in range(len(pieces))
            ]
        )
        .sort()
        .values
    )
    fraction_above = k / total
    rank = SAMPLE_SIZE * (1 - fraction_above)
    margin = 4 * math.sqrt(SAMPLE_SIZE * fraction_above * (1 - fraction_above)) + 8
    lo = float(sample[max(int(rank - margin), 0)])
    hi = float(sample[min(int(rank + margin), SAMPLE_SIZE - 1)])
    above = sum(int((p > hi).sum()) for p in pieces)
    band = torch.cat([p[(p >= lo) & (p <= hi)].cpu() for p in pieces])
    need = k - above
    if need <= 0 or need > band.numel():
        return _kth_largest_exact(pieces, k)
    return float(torch.kthvalue(band, band.numel() - need + 1).values)


def _top_k(pieces: list[Tensor], k: int) -> list[Tensor]:
    """Boolean masks (one per tensor) of the k largest entries over all ``pieces`` together.

    Entries equal to -inf are never chosen unless nothing else is left; ties at the threshold
    are broken by position (first tensor first, then flat index), so exactly k are chosen.
    """
    total = sum(p.numel() for p in pieces)
    if k <= 0:
        return [torch.zeros_like(p, dtype=torch.bool) for p in pieces]
    if k > total:
        raise ValueError(f"cannot keep {k} of {total} weights")
    threshold = _kth_largest(pieces, k)
    keep = [p > threshold for p in pieces]
    missing = k - sum(int(m.sum()) for m in keep)
    for piece, chosen in zip(pieces, keep, strict=True):
        if missing <= 0:
            break
        ties = torch.nonzero(piece.flatten() == threshold).flatten()[:missing]
        chosen.view(-1)[ties] = True
        missing -= ties.numel()
    return keep


def _candidates(name: str, scores: Tensor, alive: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Scores in a common float dtype: dead weights score -inf, strictly below every alive
    weight (an alive NaN or -inf scores the lowest finite value, kept only if needed)."""
    if alive is not None and alive.shape != scores.shape:
        raise ValueError(
            f"scores for {name!r} have shape {tuple(scores.shape)}, the mask has "
            f"{tuple(alive.shape)}"
        )
    lowest = torch.finfo(dtype).min
    values = torch.nan_to_num(scores.detach().to(dtype), nan=lowest, neginf=lowest)
    if alive is not None:
        values = values.masked_fill(~alive.to(values.device), -math.inf)
    return values


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
        n: int(current[n].sum()) if current is not None else s.numel() for n, s in clean.items()
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
        k = max(targets[name], min(min_per_layer, alive[name]))
        _check_alive(k, alive[name], repr(name))
        out[name] = _top_k([values], k)[0]
    return Masks(out)


def _check_alive(k: int, alive: int, what: str) -> None:
    if k > alive:
        raise ValueError(
            f"cannot keep {k} weights of {what}: only {alive} are still alive (a density above "
            "the current mask's)"
        )


def _global(clean: dict[str, Tensor], k: int, alive: dict[str, int], min_per_layer: int) -> Masks:
    _check_alive(k, sum(alive.values()), "the model")
    reserved = {}
    if min_per_layer:
        for name, values in clean.items():
            reserved[name] = _top_k([values], min(min_per_layer, alive[name]))[0]
            clean[name] = values.masked_fill(reserved[name], -math.inf)
        k = max(k - sum(int(r.sum()) for r in reserved.values()), 0)
    keep = _top_k(list(clean.values()), k)
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
