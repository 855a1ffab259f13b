"""Structures that meet a FLOPs budget: a global threshold on channel scores, or one width factor.

A :class:`Structure` is the outcome of every structured method in winnow: which channels of
each group are kept, with its FLOPs and parameter counts next to the dense network's. Budgets
are fractions of the dense network's FLOPs (multiply-accumulates, see
:mod:`winnow.structured.flops`): ``budget=0.5`` keeps at most about half of them.

- :func:`threshold_for_budget`: rank every channel of the chosen groups by its score (a gate
  of Pruning from Scratch, a BatchNorm |γ| for network slimming, a filter's L1 norm) and keep
  the global top fraction p, found by bisection on p so that the pruned FLOPs meet the budget
  (Wang et al. 2020: 10 iterations, stop once the FLOPs reduction is within 0.1%, relative, of
  the target).
- :func:`uniform_structure`: one factor α on every width, found by bisection (the uniform
  width-scaling baseline).

FLOPs of a candidate are computed from the traced dense network
(:func:`winnow.structured.flops.count_analysis`), exactly and without building it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from winnow.structured.dependency import Analysis, ChannelGroup, analyse
from winnow.structured.flops import count_analysis


@dataclass
class Structure:
    """Channels kept per group, and the cost of the pruned network next to the dense one.

    ``masks`` maps a group name to a boolean tensor (True = kept); ``sizes`` the group's dense
    channel count. FLOPs are MACs per sample; parameters those of the layers the forward pass
    uses.
    """

    masks: dict[str, Tensor]
    sizes: dict[str, int]
    flops: int
    dense_flops: int
    params: int
    dense_params: int

    @property
    def widths(self) -> dict[str, int]:
        """Channels kept per group."""
        return {name: int(mask.sum()) for name, mask in self.masks.items()}

    @property
    def flops_ratio(self) -> float:
        """Pruned FLOPs / dense FLOPs."""
        return self.flops / self.dense_flops

    def kept_ratios(self) -> dict[str, float]:
        """Fraction of channels kept per group."""
        return {name: int(mask.sum()) / self.sizes[name] for name, mask in self.masks.items()}

    def to_dict(self) -> dict:
        """Plain JSON data (masks as lists of 0/1)."""
        return {
            "masks": {k: [int(b) for b in v.tolist()] for k, v in self.masks.items()},
            "sizes": dict(self.sizes),
            "widths": self.widths,
            "flops": self.flops,
            "dense_flops": self.dense_flops,
            "params": self.params,
            "dense_params": self.dense_params,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Structure:
        """Inverse of :meth:`to_dict`."""
        masks = {k: torch.tensor(v, dtype=torch.bool) for k, v in data["masks"].items()}
        return cls(
            masks,
            {k: int(v) for k, v in data["sizes"].items()},
            int(data["flops"]),
            int(data["dense_flops"]),
            int(data["params"]),
            int(data["dense_params"]),
        )


def check_budget(budget: float) -> float:
    """``budget`` as a float in (0, 1], or ValueError."""
    budget = float(budget)
    if not 0 < budget <= 1:
        raise ValueError(f"a FLOPs budget is a fraction of the dense FLOPs in (0, 1], got {budget}")
    return budget


def as_analysis(model: nn.Module | Analysis, input_shape: Sequence[int] | None) -> Analysis:
    """``model`` traced (see :func:`winnow.structured.dependency.analyse`), or as given."""
    if isinstance(model, Analysis):
        return model
    if input_shape is None:
        raise ValueError("pass input_shape, the shape of one sample")
    return analyse(model, input_shape)


def default_groups(analysis: Analysis, include_tied: bool = False) -> list[ChannelGroup]:
    """The groups a method prunes by default: the prunable ones, not residual-tied."""
    return analysis.prunable(include_tied)


def _structure(analysis: Analysis, masks: dict[str, Tensor], dense) -> Structure:
    counts = count_analysis(analysis, {k: int(v.sum()) for k, v in masks.items()})
    sizes = {k: int(v.numel()) for k, v in masks.items()}
    return Structure(masks, sizes, counts.flops, dense.flops, counts.params, dense.params)


def _round_up(width: int, size: int, round_to: int) -> int:
    return min(size, max(round_to, math.ceil(width / round_to) * round_to))


def _search(
    make: Callable[[float], Structure], budget: float, bisections: int, tolerance: float
) -> Structure:
    """Bisection on x in [0, 1] (FLOPs grow with x) for a structure meeting the budget.

    Stops when the FLOPs reduction is within ``tolerance`` (relative) of the target; otherwise
    returns the structure with the largest x found under the budget. Raises ``ValueError``
    when even x = 0 (the minimum of every group) exceeds the budget.
    """
    if budget >= 1:
        return make(1.0)
    target = 1 - budget
    lo, hi, best = 0.0, 1.0, None
    for _ in range(bisections):
        mid = (lo + hi) / 2
        candidate = make(mid)
        reduction = 1 - candidate.flops_ratio
        if abs(reduction - target) <= tolerance * target:
            return candidate
        if candidate.flops_ratio > budget:
            hi = mid
        else:
            lo, best = mid, candidate
    if best is None:
        best = make(0.0)
        if best.flops_ratio > budget:
            raise ValueError(
                f"a budget of {budget:.2%} of the dense FLOPs is below the smallest structure"
                f" ({best.flops_ratio:.2%}: every group keeps its minimum of channels)"
            )
    return best


def threshold_for_budget(
    scores: Mapping[str, Tensor],
    model: nn.Module | Analysis,
    budget: float,
    input_shape: Sequence[int] | None = None,
    *,
    bisections: int = 10,
    tolerance: float = 1e-3,
    round_to: int = 1,
    seed: int = 0,
) -> Structure:
    """Keep the globally highest-scoring channels so that the FLOPs meet ``budget``.

    ``scores`` maps a group name (see :func:`winnow.structured.find_groups`) to one score per
    channel, higher = more important; groups not named keep all their channels. ``budget`` is
    the fraction of the dense FLOPs (MACs) allowed, in (0, 1]. For a fraction p of all scored
    channels, the ``round(p·N)`` best are kept (every group keeps at least ``round_to``
    channels, and with ``round_to > 1`` a group's width is rounded up to a multiple of it); p is
    found by ``bisections`` steps of bisection (10 in Wang et al. 2020), stopping early when the
    FLOPs reduction ``1 - flops/dense`` is within ``tolerance`` (relative) of ``1 - budget``;
    otherwise the largest p found under the budget wins. Equal scores (gates clamped at 0 or
    1 are common) are ordered by a random permutation seeded with ``seed``.
    """
    budget = check_budget(budget)
    analysis = as_analysis(model, input_shape)
    dense = count_analysis(analysis)
    groups = []
    for key, value in scores.items():
        group = analysis.group(key)
        if not group.prunable:
            raise ValueError(f"group {group.name!r} cannot be pruned: {group.reason}")
        value = torch.as_tensor(value).detach().to("cpu", torch.float64).flatten()
        if value.numel() != group.size:
            raise ValueError(f"{group.name!r} has {group.size} channels, {value.numel()} scores")
        groups.append((group, value))
    if not groups:
        raise ValueError("no channel group to prune")
    flat = torch.cat([value for _, value in groups])
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(flat.numel(), generator=generator)
    order = perm[torch.sort(flat[perm], descending=True, stable=True).indices]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    ranks = torch.split(rank, [g.size for g, _ in groups])

    def make(fraction: float) -> Structure:
        k = round(fraction * flat.numel())
        masks = {}
        for (group, _), group_rank in zip(groups, ranks, strict=True):
            width = _round_up(int((group_rank < k).sum()), group.size, round_to)
            mask = torch.zeros(group.size, dtype=torch.bool)
            mask[torch.argsort(group_rank)[:width]] = True
            masks[group.name] = mask
        return _structure(analysis, masks, dense)

    return _search(make, budget, bisections, tolerance)


def uniform_structure(
    model: nn.Module | Analysis,
    budget: float,
    input_shape: Sequence[int] | None = None,
    *,
    groups: Sequence[str] | None = None,
    scores: Mapping[str, Tensor] | None = None,
    include_tied: bool = False,
    bisections: int = 10,
    tolerance: float = 1e-3,
    round_to: int = 1,
) -> Structure:
    """One width factor α on every group, found by bisection so that the FLOPs meet ``budget``.

    Each group keeps ``max(round_to, round(α·size))`` channels (rounded up to a multiple of
    ``round_to``): its best by ``scores`` if given (the per-layer variant of L1-norm filter
    pruning), its first channels otherwise (which channels does not matter for a network
    trained from scratch). ``groups`` defaults to every prunable group that is not tied by a
    residual addition (``include_tied=True`` adds those). ``budget`` as in
    :func:`threshold_for_budget`.
    """
    budget = check_budget(budget)
    analysis = as_analysis(model, input_shape)
    dense = count_analysis(analysis)
    if groups is None:
        chosen = default_groups(analysis, include_tied)
    else:
        chosen = [analysis.group(name) for name in groups]
    for group in chosen:
        if not group.prunable:
            raise ValueError(f"group {group.name!r} cannot be pruned: {group.reason}")
    orders = {}
    for group in chosen:
        if scores is not None and group.name in scores:
            value = torch.as_tensor(scores[group.name]).detach().cpu().flatten()
            orders[group.name] = torch.sort(value, descending=True, stable=True).indices
        else:
            orders[group.name] = torch.arange(group.size)

    def make(alpha: float) -> Structure:
        masks = {}
        for group in chosen:
            width = _round_up(max(1, round(alpha * group.size)), group.size, round_to)
            mask = torch.zeros(group.size, dtype=torch.bool)
            mask[orders[group.name][:width]] = True
            masks[group.name] = mask
        return _structure(analysis, masks, dense)

    return _search(make, budget, bisections, tolerance)
