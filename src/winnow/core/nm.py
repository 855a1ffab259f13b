"""N:M sparsity: at most N weights kept in every M consecutive ones along the input dimension.

The pattern NVIDIA's sparse tensor cores execute (2:4 since Ampere; Mishra et al. 2021,
"Accelerating Sparse Deep Neural Networks"), and the one SparseGPT and Wanda prune to besides
unstructured sparsity. Groups run along a weight's *input* dimension: a Linear weight
``(out, in)`` is cut into groups of M consecutive entries of each row (the layout of
``torch.sparse.to_sparse_semi_structured``), a convolution ``(out, in, *kernel)`` along its
input channels at each kernel position, and Hugging Face's ``Conv1D``, whose weight is stored
``(in, out)``, along dimension 0 (:func:`input_dims` says which dimension for each weight).

:func:`nm_select` keeps the N highest scores of every group, ties broken by position (the first
wins); :func:`nm_violations` counts the groups that keep more than N.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_PATTERN = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


@dataclass(frozen=True)
class Pattern:
    """N:M: at most ``n`` kept in every ``m`` consecutive weights along the input dimension."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not 0 <= self.n <= self.m or self.m < 1:
            raise ValueError(f"an N:M pattern needs 0 <= N <= M and M >= 1, got {self.n}:{self.m}")

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """``"2:4"`` as a :class:`Pattern`; ``ValueError`` for anything else."""
    if isinstance(pattern, Pattern):
        return pattern
    found = _PATTERN.fullmatch(pattern) if isinstance(pattern, str) else None
    if found is None:
        raise ValueError(f"an N:M pattern is written 'N:M' (e.g. '2:4'), got {pattern!r}")
    return Pattern(int(found.group(1)), int(found.group(2)))


def is_pattern(scope: object) -> bool:
    """Whether ``scope`` names an N:M pattern (``"2:4"``) rather than a scope."""
    return isinstance(scope, Pattern) or (
        isinstance(scope, str) and _PATTERN.fullmatch(scope) is not None
    )


def input_dim(module: nn.Module, param_name: str = "weight") -> int:
    """The input dimension of a module's weight: 0 for Hugging Face's ``Conv1D`` (stored
    ``(in, out)``), 1 for every other layer (Linear, convolutions, recurrent, attention)."""
    if type(module).__name__ == "Conv1D" and param_name == "weight":
        return 0
    return 1


def input_dims(model: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """:func:`input_dim` of each fully qualified parameter name of ``model``."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        out[name] = input_dim(modules.get(owner, model), attr)
    return out


def _grouped(tensor: Tensor, m: int, dim: int, name: str) -> Tensor:
    """``tensor`` with ``dim`` moved last and cut into groups of ``m``: ``(..., groups, m)``."""
    if tensor.dim() < 2:
        raise ValueError(f"{name!r} has shape {tuple(tensor.shape)}: N:M needs a weight matrix")
    size = tensor.shape[dim]
    if size % m:
        raise ValueError(
            f"the N:M pattern's M = {m} does not divide the input dimension of {name!r} "
            f"(size {size} along dimension {dim} of {tuple(tensor.shape)})"
        )
    moved = tensor.movedim(dim, -1)
    return moved.reshape(*moved.shape[:-1], size // m, m)


def _ungrouped(grouped: Tensor, shape: torch.Size, dim: int) -> Tensor:
    moved_shape = [s for i, s in enumerate(shape) if i != dim % len(shape)] + [shape[dim]]
    return grouped.reshape(moved_shape).movedim(-1, dim)


def nm_select(
    scores: Tensor,
    pattern: str | Pattern,
    dim: int = 1,
    current: Tensor | None = None,
    name: str = "weight",
) -> Tensor:
    """The boolean mask keeping the ``n`` highest scores of every ``m`` consecutive entries
    along ``dim``, ties broken by position (the first wins). Entries already pruned in
    ``current`` are never kept (a group with fewer than ``n`` alive keeps those).

    Raises ``ValueError`` when ``m`` does not divide the size of ``dim`` (naming ``name``).
    """
    pattern = parse_pattern(pattern)
    n, m = pattern.n, pattern.m
    dim = dim % max(scores.dim(), 1)
    values = scores.detach().to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    grouped = _grouped(values, m, dim, name)
    alive = None
    if current is not None:
        if current.shape != scores.shape:
            raise ValueError(
                f"mask of {name!r} has shape {tuple(current.shape)}, scores {tuple(scores.shape)}"
            )
        alive = _grouped(current.to(scores.device), m, dim, name)
        grouped = grouped.masked_fill(~alive, -torch.inf)
    # a stable descending sort ranks equal scores by position; the first n of each group stay
    order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, order, True)
    if alive is not None:
        keep &= alive
    return _ungrouped(keep, scores.shape, dim)


def nm_violations(mask: Tensor, pattern: str | Pattern, dim: int = 1, name: str = "weight") -> int:
    """How many groups of ``m`` along ``dim`` keep more than ``n`` entries (0: the mask has the
    pattern)."""
    pattern = parse_pattern(pattern)
    kept = _grouped(mask.to(torch.int32), pattern.m, dim, name).sum(-1)
    return int((kept > pattern.n).sum())


def check_nm(
    masks: Mapping[str, Tensor], pattern: str | Pattern, dims: Mapping[str, int] | None = None
) -> None:
    """``ValueError`` naming the tensors of ``masks`` that break the N:M ``pattern``."""
    broken = {
        name: count
        for name, mask in masks.items()
        if (count := nm_violations(mask, pattern, (dims or {}).get(name, 1), name))
    }
    if broken:
        shown = ", ".join(f"{n!r} ({c} groups)" for n, c in list(broken.items())[:3])
        raise ValueError(f"masks break the {parse_pattern(pattern)} pattern: {shown}")
