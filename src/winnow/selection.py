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
SynFlow code spends two thirds of its 100-round loop in a global ``kthvalue``). winnow finds it
with ``numpy.partition`` (introselect) on the alive scores only, in one pass, without sorting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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


def _kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest value (1-based) of a 1-D array, by introselect."""
    return float(np.partition(values, values.size - k)[values.size - k])


def _top_k_flat(values: Tensor, k: int, eligible: Tensor | None = None) -> Tensor:
    """Boolean mask of the k largest eligible entries of a 1-D tensor.

    Only entries where ``eligible`` is true can be chosen (all if it is None); ties at the
    threshold are broken by lower index, so exactly k entries are chosen.
    """
    keep = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    index = None if eligible is None else torch.nonzero(eligible).flatten()
    candidates = values if index is None else values[index]
    if k <= 0:
        return keep
    if k > candidates.numel():
        raise ValueError(f"cannot keep {k} of {candidates.numel()} eligible weights")
    if k == candidates.numel():
        chosen = torch.ones(k, dtype=torch.bool, device=values.device)
    else:
        threshold = _kth_largest(candidates.detach().cpu().numpy(), k)
        chosen = candidates > threshold
        missing = k - int(chosen.sum())
        if missing > 0:
            chosen[torch.nonzero(candidates == threshold).flatten()[:missing]] = True
    if index is None:
        return chosen
    keep[index[chosen]] = True
    return keep


def _clean(name: str, scores: Tensor, alive: Tensor | None) -> Tensor:
    """Scores as a float tensor; NaN scores -inf (kept only if nothing else is left)."""
    if not scores.is_floating_point():
        scores = scores.float()
    if alive is not None and alive.shape != scores.shape:
        raise ValueError(
            f"scores for {name!r} have shape {tuple(scores.shape)}, the mask has "
            f"{tuple(alive.shape)}"
        )
    return torch.nan_to_num(scores.detach(), nan=-math.inf)


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
    clean = {n: _clean(n, s, None if current is None else current[n]) for n, s in scores.items()}
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
        return _per_layer(clean, targets, alive, min_per_layer)
    value = check_density(density)
    if scope == "layer":
        targets = {n: round(value * s.numel()) for n, s in clean.items()}
        return _per_layer(clean, targets, alive, min_per_layer)
    total = sum(s.numel() for s in clean.values())
    return _global(clean, round(value * total), alive, min_per_layer)


def _check_alive(k: int, alive: int, what: str) -> None:
    if k > alive:
        raise ValueError(
            f"cannot keep {k} weights of {what}: only {alive} are still alive (a density above "
            "the current mask's)"
        )


def _per_layer(
    clean: dict[str, Tensor], targets: dict[str, int], alive: dict[str, Tensor], min_per_layer: int
) -> Masks:
    out = {}
    for name, values in clean.items():
        count = int(alive[name].sum())
        k = max(targets[name], min(min_per_layer, count))
        _check_alive(k, count, repr(name))
        out[name] = _top_k_flat(values.flatten(), k, alive[name].flatten()).reshape(values.shape)
    return Masks(out)


def _global(
    clean: dict[str, Tensor], k: int, alive: dict[str, Tensor], min_per_layer: int
) -> Masks:
    names = list(clean)
    _check_alive(k, sum(int(a.sum()) for a in alive.values()), "the model")
    reserved = {}
    for name in names:
        count = min(min_per_layer, int(alive[name].sum()))
        reserved[name] = _top_k_flat(clean[name].flatten(), count, alive[name].flatten())
    k = max(k - sum(int(r.sum()) for r in reserved.values()), 0)
    flat = torch.cat([clean[n].flatten().to(torch.float64).cpu() for n in names])
    eligible = torch.cat([(alive[n].flatten() & ~reserved[n]).cpu() for n in names])
    keep = _top_k_flat(flat, k, eligible)
    out, offset = {}, 0
    for name in names:
        size = clean[name].numel()
        chosen = keep[offset : offset + size].to(clean[name].device) | reserved[name]
        out[name] = chosen.reshape(clean[name].shape)
        offset += size
    return Masks(out)


def exponential_densities(density: float, rounds: int) -> list[float]:
    """The densities d^(k/n) for k = 1..n (SynFlow's schedule; the last one is d)."""
    check_density(density)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [density ** (k / rounds) for k in range(1, rounds + 1)]
