"""Densities and sparsities: checks, and the exponential schedule of iterative pruning.

*Density* is the fraction of weights kept, *sparsity* the fraction removed, both in [0, 1];
every public function of winnow says which one it takes.
"""

from __future__ import annotations

import math

SCOPES = ("global", "layer")
"""Where a density applies: one threshold across all tensors, or each tensor on its own."""


def check_scope(scope: str) -> str:
    """``scope`` if it is one of :data:`SCOPES`, else ``ValueError`` naming the choices."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
    return scope


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


def exponential_densities(density: float, rounds: int) -> list[float]:
    """The densities d^(k/n) for k = 1..n (SynFlow's schedule; the last one is d)."""
    check_density(density)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [density ** (k / rounds) for k in range(1, rounds + 1)]
