"""One layer at a time: prune a weight matrix W (out × in) given its inputs' statistics.

Each solver takes W and the layer's input Gram matrix S = Σ_t x_t x_tᵀ over the ``tokens``
calibration inputs x_t (rows of X, in × in), and returns the pruned weights and the keep-mask,
for a density (unstructured) or an N:M pattern along the input dimension:

- :func:`magnitude_rows`: |W_ij|, the top fraction within each output row (or N of every M).
- :func:`wanda`: Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
  Models": |W_ij|·‖X_j‖₂ with ‖X_j‖₂ = sqrt(S_jj), compared within each output row.
- :func:`sparsegpt`: Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot": the Optimal Brain Surgeon update (Hassibi & Stork 1993) of
  every row at once with the layer Hessian H = 2XᵀX/tokens (+ λI, λ = 1% of mean diag H),
  column by column: pruning column j of a row costs w_j²/[H⁻¹]_jj and the remaining columns
  absorb δ = −(w_j/[H⁻¹]_jj)·H⁻¹_{j,j:} — using the upper Cholesky factor of H⁻¹, whose row j
  is H⁻¹ restricted to the columns not yet processed. The mask is chosen per block of 128
  columns (adaptive mask selection; for N:M, per group of M at its first column), and updates
  outside the block are applied once per block (lazy batch updates). Inputs that never occur
  (S_jj = 0) are pruned and given H_jj = 1.

:func:`reconstruction_error` is ‖WX − ŴX‖²_F = tr(ΔW S ΔWᵀ).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from winnow.core.nm import Pattern, nm_select
from winnow.core.ranking import lowest_mask

DAMPING = 0.01
"""SparseGPT's damping: λ = 1% of the mean of diag(H)."""
BLOCK_SIZE = 128
"""SparseGPT's columns per block (mask selection and lazy updates)."""


class DampingWarning(UserWarning):
    """H was not positive definite at the asked damping (too little calibration data for the
    layer's width); the damping was raised until it was."""


def _keep_per_row(scores: Tensor, density: float) -> Tensor:
    """The top ``round(density · in)`` scores of every row (ties: the first position wins)."""
    k = round(density * scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def _check_target(density: float | None, pattern: Pattern | None) -> None:
    if (density is None) == (pattern is None):
        raise ValueError("give exactly one of density (unstructured) and pattern (N:M)")
    if density is not None and not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1] (the fraction kept), got {density}")


def row_scores_mask(
    scores: Tensor, density: float | None = None, pattern: Pattern | None = None
) -> Tensor:
    """Keep-mask from scores compared within each output row: the top fraction ``density`` of
    every row, or the top N of every M consecutive inputs."""
    _check_target(density, pattern)
    if pattern is not None:
        return nm_select(scores, pattern, dim=1)
    return _keep_per_row(scores, density)


def magnitude_rows(
    weight: Tensor, gram: Tensor | None = None, tokens: int = 0, *,
    density: float | None = None, pattern: Pattern | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-row magnitude: keep the largest |W_ij| of each row. Returns (pruned W, keep-mask)."""
    keep = row_scores_mask(weight.abs(), density, pattern)
    return weight * keep, keep


def wanda_scores(weight: Tensor, gram: Tensor) -> Tensor:
    """Wanda's scores |W_ij|·‖X_j‖₂, with ‖X_j‖₂² = S_jj the sum of squares of input j."""
    return weight.abs() * torch.diagonal(gram).clamp_min(0).sqrt().to(weight.dtype)


def wanda(
    weight: Tensor, gram: Tensor, tokens: int = 0, *,
    density: float | None = None, pattern: Pattern | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Wanda: keep the largest |W_ij|·‖X_j‖₂ of each row (no weight update)."""
    keep = row_scores_mask(wanda_scores(weight, gram), density, pattern)
    return weight * keep, keep


def _inverse_factor(hessian: Tensor, damping: float) -> Tensor:
    """The upper Cholesky factor of (H + λI)⁻¹ with λ = ``damping`` · mean(diag H); λ is
    raised tenfold (with a :class:`DampingWarning`) until H + λI is positive definite."""
    mean = float(torch.diagonal(hessian).mean())
    scale = mean if mean > 0 else 1.0
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(8):
        factor, info = torch.linalg.cholesky_ex(hessian + damping * scale * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                if attempt:
                    warnings.warn(
                        f"the layer Hessian is singular at the asked damping (too little "
                        f"calibration data for {hessian.shape[0]} inputs?); damped with "
                        f"{damping:g} x mean diag(H)",
                        DampingWarning,
                        stacklevel=4,
                    )
                return upper
        damping = damping * 10 if damping > 0 else 1e-6
    raise ValueError("the layer Hessian is not positive definite even with heavy damping")


def sparsegpt(
    weight: Tensor,
    gram: Tensor,
    tokens: int,
    *,
    density: float | None = None,
    pattern: Pattern | None = None,
    damping: float = DAMPING,
    block_size: int = BLOCK_SIZE,
) -> tuple[Tensor, Tensor]:
    """SparseGPT on one layer (see the module docstring). Returns (pruned W, keep-mask); the
    kept weights are updated to compensate for the pruned ones. Computes in float32 (float64
    if W is float64) and returns W's dtype."""
    _check_target(density, pattern)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype).clone()
    rows, cols = w.shape
    if pattern is not None and (cols % pattern.m or block_size % pattern.m):
        raise ValueError(
            f"the pattern {pattern} needs M = {pattern.m} to divide the {cols} inputs and the "
            f"block size {block_size}"
        )
    hessian = gram.detach().to(dtype) * (2.0 / max(tokens, 1))
    dead = torch.diagonal(hessian) == 0
    if bool(dead.any()):
        hessian[dead, dead] = 1.0
        w[:, dead] = 0.0
    factor = _inverse_factor(hessian, damping)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    diagonal = torch.diagonal(factor)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end]  # a view: updated in place
        local = factor[start:end, start:end]
        local_diag = diagonal[start:end]
        # errors[i] = (w_i − ŵ_i)/[U]_ii for column i of the block, as rows of a contiguous array
        errors = torch.empty(end - start, rows, dtype=dtype, device=w.device)
        if pattern is None:  # the block's share of the layer's exact count, rounded once
            cost = block.pow(2) / local_diag.pow(2)
            k = round((1.0 - density) * rows * end) - round((1.0 - density) * rows * start)
            drop = lowest_mask(cost, k)  # ties by position, as a stable sort would
            scale = drop.to(dtype) / local_diag
        else:
            drop = torch.zeros_like(block, dtype=torch.bool)
            scale = torch.zeros_like(block)
        for i in range(end - start):
            if pattern is not None and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                cost = block[:, group].pow(2) / local_diag[group].pow(2)
                worst = torch.sort(cost, dim=1, stable=True).indices[:, : pattern.m - pattern.n]
                drop[:, group].scatter_(1, worst, True)
                scale[:, group] = drop[:, group].to(dtype) / local_diag[group]
            # one product and one rank-1 update per column: the error is 0 where w_i is kept
            torch.mul(block[:, i], scale[:, i], out=errors[i])
            block[:, i:].addr_(errors[i], local[i, i:], alpha=-1.0)
        block.masked_fill_(drop, 0.0)  # exact zeros where the update left rounding residue
        w[:, end:].addmm_(errors.T, factor[start:end, end:], alpha=-1.0)
        pruned[:, start:end] = drop
    keep = ~pruned
    if bool(dead.any()):
        keep[:, dead] = False
    return (w * keep).to(weight.dtype), keep


def reconstruction_error(weight: Tensor, pruned: Tensor, gram: Tensor) -> float:
    """‖WX − ŴX‖²_F over the calibration inputs: tr((W − Ŵ) S (W − Ŵ)ᵀ)."""
    delta = (weight.detach() - pruned.detach()).to(gram.dtype)
    return float(((delta @ gram) * delta).sum())


SOLVERS = {"magnitude": magnitude_rows, "wanda": wanda, "sparsegpt": sparsegpt}
"""The layer solvers by name: ``f(W, S, tokens, density=... | pattern=...) -> (Ŵ, keep)``."""


def solve(
    method: str,
    weight: Tensor,
    gram: Tensor,
    tokens: int,
    density: float | None = None,
    pattern: Pattern | None = None,
    **options,
) -> tuple[Tensor, Tensor]:
    """The solver ``method`` of :data:`SOLVERS` on one layer."""
    if method not in SOLVERS:
        raise ValueError(f"unknown one-shot method {method!r}; choose one of {sorted(SOLVERS)}")
    if method != "sparsegpt" and options:
        raise ValueError(f"{method} takes no options, got {sorted(options)}")
    if not math.isfinite(float(weight.detach().abs().sum())):
        raise ValueError("the layer's weights hold NaN or infinite values")
    return SOLVERS[method](weight, gram, tokens, density=density, pattern=pattern, **options)
