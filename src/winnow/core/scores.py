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
