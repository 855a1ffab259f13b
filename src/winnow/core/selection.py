"""Selection: from scores to masks (how many weights to keep, and where).

:func:`select` takes *density* (the fraction kept, in [0, 1]) and returns
:class:`~winnow.core.masks.Masks`. Scores follow winnow's convention: higher = more important =
kept. It keeps the top-k scores globally (one threshold for the whole model) or per layer (the
same density in every tensor, or a density per tensor), among the weights still alive in
``current``; ties are broken by position, so the result has exactly k weights and is
deterministic. A guard keeps at least ``min_per_layer`` weights in every tensor.

The work is done by the private engine :mod:`winnow.core._topk` (exact top-k among the alive
weights without sorting, in compiled passes); iterative pruning keeps one of its
``Survivors`` from round to round (:class:`winnow.schedules.Pruner`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from winnow.core._topk import Survivors
from winnow.core.masks import Masks
from winnow.core.nm import Pattern, is_pattern, nm_select, parse_pattern
from winnow.core.scores import NonFiniteError, check_nonfinite, factors, nonfinite_message


def select(
    scores: Mapping[str, Tensor],
    density: float | Mapping[str, float] | None,
    scope: str = "global",
    current: Masks | None = None,
    min_per_layer: int = 0,
    nonfinite: str = "error",
    input_dims: Mapping[str, int] | None = None,
) -> Masks:
    """Keep the highest-scoring weights: the top ``round(density * n)`` of them.

    Args:
        scores: parameter name -> scores (higher = keep), any float dtype.
        density: the fraction of all weights to keep, in [0, 1] (relative to the whole tensor
            or model, not to the weights still alive); or a mapping name -> density, which
            implies per-layer selection (e.g. to give a random mask the per-layer densities of
            another mask).
        scope: ``"global"`` (one threshold across all tensors), ``"layer"`` (each tensor
            keeps its own fraction), or an N:M pattern such as ``"2:4"``: the top N of every M
            consecutive weights along each tensor's input dimension (``input_dims``: name ->
            dimension, default 1; see :mod:`winnow.core.nm`). With a pattern, ``density`` is
            None or N/M, and the masks record the pattern.
        current: weights already pruned stay pruned (iterative pruning). ``ValueError`` if the
            density asks for more weights than are alive.
        min_per_layer: keep at least this many weights in every tensor (a guard against layer
            collapse); they count towards the total.
        nonfinite: ``"error"`` (default): a NaN or infinite score of a weight still alive
            raises :class:`~winnow.core.scores.NonFiniteError` naming the tensors (a NaN weight
            or input makes every score of a gradient criterion NaN, and NaN has no rank);
            ``"lowest"``: NaN and -inf rank below every finite score, +inf above.

    The masks are on the devices of the scores. Ties are broken by position: the first tensor
    first, then the flat index.
    """
    if is_pattern(scope):
        return _select_pattern(scores, density, parse_pattern(scope), current, nonfinite,
                               input_dims or {})  # fmt: skip
    survivors = Survivors({n: factors(scores, n)[0].shape for n in scores}, current)
    keep = survivors.choose(
        scores, density, scope=scope, min_per_layer=min_per_layer, nonfinite=nonfinite
    )
    devices = {n: factors(scores, n)[0].device for n in scores}
    return survivors.masks(devices, keep)


def _select_pattern(
    scores: Mapping[str, Tensor],
    density: float | Mapping[str, float] | None,
    pattern: Pattern,
    current: Masks | None,
    nonfinite: str,
    input_dims: Mapping[str, int],
) -> Masks:
    """N:M selection: the top N of every M along each tensor's input dimension."""
    check_nonfinite(nonfinite)
    if isinstance(density, Mapping) or (
        density is not None and not math.isclose(float(density), pattern.density, abs_tol=1e-9)
    ):
        raise ValueError(
            f"an N:M pattern keeps {pattern} of the weights (density {pattern.density:g}); "
            f"got density {density!r}"
        )
    if current is not None and set(current) != set(scores):
        raise ValueError("scores and current masks cover different parameters")
    masks, patterns, bad = {}, {}, {}
    for name in scores:
        values = scores[name].detach()
        alive = None if current is None else current[name].to(values.device)
        finite = torch.isfinite(values) if alive is None else torch.isfinite(values) | ~alive
        if not bool(finite.all()):
            bad[name] = int((~finite).sum())
            values = torch.nan_to_num(values, nan=-torch.inf)
        dim = input_dims.get(name, 1)
        masks[name] = nm_select(values, pattern, dim, alive, name)
        patterns[name] = (pattern.n, pattern.m, dim % values.dim())
    if bad and nonfinite == "error":
        raise NonFiniteError(nonfinite_message(bad, "scores"))
    return Masks(masks, patterns)
