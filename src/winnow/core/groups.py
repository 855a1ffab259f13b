"""Structured selection: keep or remove whole groups of weights (filters, neurons, input
channels, blocks) by a reduction of their members' scores."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from winnow.core.densities import check_density, check_scope
from winnow.core.masks import Masks

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
    check_scope(scope)
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
