"""Pruning during training: gradual pruning and dense-sparse-dense phases.

Both are :class:`~winnow.schedules.Pruner` objects, stepped by the training loop like a
learning-rate scheduler: ``winnow.train(model, data, config, pruner=GradualPruner(...))``
calls ``pruner.step(iteration, model)`` before the first step and after every step, and
enforces the masks it returns from then on (:meth:`winnow.MaskEnforcer.update`). Any loop can
drive them the same way.

- :class:`GradualPruner`: Zhu & Gupta 2017, "To prune, or not to prune": the sparsity follows
  s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(nΔt))³ for t = t₀, t₀ + Δt, ..., t₀ + nΔt, pruning the
  lowest-scoring weights every Δt steps and reaching s_f exactly at t₀ + nΔt
  (:class:`~winnow.schedules.density.Gradual`).
- :class:`DenseSparseDense`: Han et al. 2017, "DSD: Dense-Sparse-Dense Training", and the
  iterative hard thresholding of Jin et al. 2016: phases that alternate a sparse mask (chosen
  afresh at the start of the phase) with dense phases in which the pruned weights come back,
  starting from zero (:class:`~winnow.schedules.density.Phases`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from winnow.criteria.registry import Criterion
from winnow.schedules.density import Gradual, Phases
from winnow.schedules.pruner import Pruner, ScoreFunction


class GradualPruner(Pruner):
    """Gradual pruning along the polynomial schedule (Zhu & Gupta 2017).

    Prunes at t = ``begin`` + j·``frequency`` for j = 0..n with n = (``end`` − ``begin``) /
    ``frequency`` (which must be a whole number), to the sparsity of
    :class:`~winnow.schedules.density.Gradual`; the last pruning step, at ``end``, reaches
    ``final_sparsity`` exactly (the top round((1 − s_f)·N) weights are kept). Weights pruned
    once stay pruned. ``scorer``: the criterion (default magnitude |θ|; a registered name or a
    function of the model); ``scope`` "global" or "layer". Sparsities are fractions removed,
    in [0, 1).
    """

    def __init__(
        self,
        final_sparsity: float,
        begin: int,
        end: int,
        frequency: int,
        initial_sparsity: float = 0.0,
        scope: str = "global",
        scorer: str | Criterion | ScoreFunction = "magnitude",
        **pruner: Any,
    ) -> None:
        schedule = Gradual(final_sparsity, begin, end, frequency, initial_sparsity)
        super().__init__(scorer, schedule, scope=scope, **pruner)

    def sparsity(self, iteration: int) -> float:
        """The target sparsity at ``iteration``."""
        return self.schedule.sparsity(iteration)


class DenseSparseDense(Pruner):
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
        scorer: str | Criterion | ScoreFunction = "magnitude",
        **pruner: Any,
    ) -> None:
        super().__init__(scorer, Phases(phases), scope=scope, **pruner)

    @property
    def phases(self) -> tuple[tuple[int, float], ...]:
        return self.schedule.phases
