"""Pruning during training: gradual pruning and dense-sparse-dense phases.

Both are *pruners*, stepped by the training loop like a learning-rate scheduler:
``winnow.train(model, data, config, pruner=GradualPruner(...))`` calls ``pruner(iteration,
model)`` before the first step and after every step, and enforces the masks it returns from
then on (:meth:`winnow.MaskEnforcer.update`). Any loop can drive them the same way.

- :class:`GradualPruner`: Zhu & Gupta 2017, "To prune, or not to prune": the sparsity follows
  s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(nΔt))³ for t = t₀, t₀ + Δt, ..., t₀ + nΔt, pruning the
  lowest-scoring weights every Δt steps and reaching s_f exactly at t₀ + nΔt.
- :class:`DenseSparseDense`: Han et al. 2017, "DSD: Dense-Sparse-Dense Training", and the
  iterative hard thresholding of Jin et al. 2016: phases that alternate a sparse mask (chosen
  afresh by magnitude at the start of the phase) with dense phases in which the pruned weights
  come back, starting from zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from winnow.core.densities import SCOPES, check_density, check_sparsity
from winnow.core.masks import Masks, prunable_parameters
from winnow.core.selection import select

Scorer = Callable[[nn.Module], Mapping[str, Tensor]]


def magnitude_scores(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """|θ| of the prunable weights (or of ``names``), detached."""
    return {n: p.detach().abs() for n, p in prunable_parameters(model, names).items()}


def polynomial_sparsity(
    iteration: int, final: float, begin: int, steps: int, frequency: int, initial: float = 0.0
) -> float:
    """Zhu & Gupta 2017's schedule: s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(nΔt))³.

    ``final`` = s_f, ``initial`` = s_i, ``begin`` = t₀, ``steps`` = n pruning steps,
    ``frequency`` = Δt. Before t₀ the sparsity is s_i (0 if no pruning yet); after t₀ + nΔt it
    is s_f.
    """
    span = steps * frequency
    if span <= 0:
        return final
    progress = min(max((iteration - begin) / span, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualPruner:
    """Gradual pruning along the polynomial schedule (Zhu & Gupta 2017).

    Prunes at t = ``begin`` + j·``frequency`` for j = 0..n with n = (``end`` − ``begin``) /
    ``frequency`` (which must be a whole number), to the sparsity :func:`polynomial_sparsity`
    gives; the last pruning step, at ``end``, reaches ``final_sparsity`` exactly (the top
    round((1 − s_f)·N) weights are kept). Weights pruned once stay pruned. ``scorer`` maps the
    model to scores (default |θ|; any function of the model, e.g. a data-driven criterion);
    ``scope`` is "global" or "layer". Sparsities are fractions removed, in [0, 1).
    """

    def __init__(
        self,
        final_sparsity: float,
        begin: int,
        end: int,
        frequency: int,
        initial_sparsity: float = 0.0,
        scope: str = "global",
        scorer: Scorer | None = None,
    ):
        self.final = check_sparsity(final_sparsity)
        self.initial = check_sparsity(initial_sparsity)
        if frequency < 1 or begin < 0 or end < begin:
            raise ValueError(
                f"need 0 <= begin <= end and frequency >= 1, got begin={begin}, end={end}, "
                f"frequency={frequency}"
            )
        if (end - begin) % frequency:
            raise ValueError(
                f"end - begin ({end - begin}) must be a multiple of the frequency ({frequency}) "
                "so that the last pruning step reaches the final sparsity"
            )
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
        self.begin, self.end, self.frequency = begin, end, frequency
        self.steps = (end - begin) // frequency
        self.scope = scope
        self.scorer = scorer or magnitude_scores
        self.masks: Masks | None = None

    def __repr__(self) -> str:
        return (
            f"GradualPruner({self.initial:g} -> {self.final:g} over iterations "
            f"{self.begin}..{self.end} every {self.frequency}, {self.scope})"
        )

    def sparsity(self, iteration: int) -> float:
        """The target sparsity at ``iteration``."""
        return polynomial_sparsity(
            iteration, self.final, self.begin, self.steps, self.frequency, self.initial
        )

    def __call__(self, iteration: int, model: nn.Module) -> Masks | None:
        """New masks at a pruning step, None otherwise."""
        if iteration < self.begin or iteration > self.end:
            return None
        if (iteration - self.begin) % self.frequency:
            return None
        self.masks = select(
            self.scorer(model), 1.0 - self.sparsity(iteration), self.scope, current=self.masks
        )
        return self.masks


class DenseSparseDense:
    """Alternating dense and sparse phases (Han et al. 2017; Jin et al. 2016).

    ``phases`` lists ``(start_iteration, density)`` in increasing order of start: at each start
    the masks change to the top ``density`` of the weights by the scorer's scores (default
    |θ|), chosen among all weights (so a sparse phase after a dense one re-selects freely), or
    to all-kept for density 1. Weights pruned in a sparse phase are 0.0 when the next dense
    phase restores them, and train again from there (DSD's re-dense step). Densities are
    fractions kept, in [0, 1].
    """

    def __init__(
        self,
        phases: Sequence[tuple[int, float]],
        scope: str = "global",
        scorer: Scorer | None = None,
    ):
        if not phases:
            raise ValueError("give at least one (start_iteration, density) phase")
        starts = [int(s) for s, _ in phases]
        if starts != sorted(set(starts)) or starts[0] < 0:
            raise ValueError(f"phase starts must be increasing and >= 0, got {starts}")
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
        self.phases = [(int(s), check_density(d)) for s, d in phases]
        self.scope = scope
        self.scorer = scorer or magnitude_scores
        self.end = self.phases[-1][0]

    def __repr__(self) -> str:
        return f"DenseSparseDense({self.phases}, {self.scope})"

    def __call__(self, iteration: int, model: nn.Module) -> Masks | None:
        for start, density in self.phases:
            if start == iteration:
                scores = self.scorer(model)
                if density == 1.0:
                    return Masks({n: s.new_ones(s.shape, dtype=bool) for n, s in scores.items()})
                return select(scores, density, self.scope)
        return None
