"""The baselines every pruning paper compares against: random scores and weight magnitude."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from winnow.criteria.options import Checked
from winnow.criteria.registry import register


@dataclass(frozen=True)
class RandomOptions(Checked):
    """``seed``: the generator's seed (the same seed gives the same scores)."""

    seed: int = 0


@register("random", RandomOptions, reads_only=True)
def random(
    work: nn.Module, params: dict[str, nn.Parameter], data, options: RandomOptions, state=None
) -> dict[str, Tensor]:
    """Random scores: i.i.d. uniform in [0, 1) from a generator seeded with ``seed``.

    Keeping the top-k of random scores gives a uniformly random mask at the chosen density (per
    layer or globally). Pruned weights (``masks``) score like the others; selection ignores them.
    """
    gen = torch.Generator().manual_seed(options.seed)
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in params.items()}


def magnitude_scores(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``|θ|`` of each tensor, detached (Han et al. 2015; the lottery-ticket criterion)."""
    return {n: w.detach().abs() for n, w in weights.items()}


@register("magnitude", reads_only=True)
def magnitude(
    work: nn.Module, params: dict[str, nn.Parameter], data, options, state=None
) -> dict[str, Tensor]:
    """Magnitude: ``|θ|`` (Han et al. 2015; the lottery-ticket criterion)."""
    return magnitude_scores(params)
