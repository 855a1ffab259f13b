"""Scores: what a criterion returns and selection reads (higher = more important = kept).

Scores are a mapping from parameter name to a tensor of the parameter's shape, any float
dtype. :class:`AbsProductScores` holds scores of the form ``|a ⊙ b|`` as their two factors, so
that selection forms the product only where it reads it (SynFlow's ``|θ ⊙ ∂R/∂θ|`` over the
weights still alive, round after round).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

NONFINITE = ("error", "lowest")
"""What selection does with NaN and infinite scores: raise :class:`NonFiniteError`, or rank
NaN and -inf below every finite score and +inf above."""


class NonFiniteError(ValueError):
    """Weights or scores hold NaN or infinite values; the message names the tensors."""


def check_nonfinite(policy: str) -> str:
    if policy not in NONFINITE:
        raise ValueError(f"unknown nonfinite policy {policy!r}; choose one of {NONFINITE}")
    return policy


def nonfinite_message(counts: Mapping[str, int], what: str) -> str:
    """One line naming the tensors of ``counts`` (name -> how many values are not finite)."""
    named = [f"{n!r} ({c})" for n, c in counts.items() if c]
    more = f" and {len(named) - 3} more" if len(named) > 3 else ""
    return (
        f"the {what} of {', '.join(named[:3])}{more} hold NaN or infinite values: a weight, "
        "the data or the loss is not finite (check the model's weights and the inputs)"
    )


def check_finite(tensors: Mapping[str, Tensor], what: str = "weights") -> None:
    """Raise :class:`NonFiniteError` naming every tensor of ``tensors`` with a NaN or an
    infinity (one reduction per tensor: NaN and infinities survive a sum; a sum that overflows
    is checked value by value)."""
    sums = [t.detach().sum(dtype=torch.float64) if t.numel() else None for t in tensors.values()]
    counts = {}
    for (name, tensor), total in zip(tensors.items(), sums, strict=True):
        if total is not None and not torch.isfinite(total):
            counts[name] = int((~torch.isfinite(tensor.detach())).sum())
    if any(counts.values()):
        raise NonFiniteError(nonfinite_message(counts, what))


class AbsProductScores(Mapping[str, Tensor]):
    """Scores of the form ``|a ⊙ b|`` per tensor (SynFlow's ``|θ ⊙ ∂R/∂θ|``), formed only where
    they are read.

    Indexing forms the dense tensor, as torch computes it; :class:`Survivors` compute the
    product at the alive weights only, in the same floating-point arithmetic, instead of
    forming it for every weight each round. The factors are held, not copied: read the scores
    before changing them.
    """

    def __init__(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        self.factors = dict(factors)

    def __getitem__(self, name: str) -> Tensor:
        a, b = self.factors[name]
        return (a * b).abs_()

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)


def factors(scores: Mapping[str, Tensor], name: str) -> tuple[Tensor, ...]:
    if isinstance(scores, AbsProductScores):
        return scores.factors[name]
    return (scores[name],)


def float_dtype(scores: Mapping[str, Tensor]) -> torch.dtype:
    """float64 if any score is float64, else float32 (numpy has no bfloat16)."""
    wide = any(t.dtype == torch.float64 for n in scores for t in factors(scores, n))
    return torch.float64 if wide else torch.float32
