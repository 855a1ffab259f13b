"""The baselines every pruning paper compares against: random scores and weight magnitude."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from winnow.criteria._registry import register


@register("random")
def random(
    work: nn.Module, params: dict[str, nn.Parameter], data=None, seed: int = 0
) -> dict[str, Tensor]:
    """Random scores: i.i.d. uniform in [0, 1) from a generator seeded with ``seed``.

    Keeping the top-k of random scores gives a uniformly random mask at the chosen density (per
    layer or globally). Pruned weights (``masks``) score like the others; selection ignores them.
    """
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in params.items()}


@register("magnitude")
def magnitude(work: nn.Module, params: dict[str, nn.Parameter], data=None) -> dict[str, Tensor]:
    """Magnitude: ``|θ|`` (Han et al. 2015; the lottery-ticket criterion)."""
    return {n: p.detach().abs() for n, p in params.items()}
