"""Schedules: when to score and select.

- :func:`prune_at_init` (``at_init``): before training, one-shot or iterative over rounds at
  the densities d^(k/n) (SNIP, GraSP, SynFlow).
- :func:`iterative_magnitude_pruning` (``lottery``): train, prune a fraction of the remaining
  weights by magnitude, reset the survivors to θ₀ or rewind them to θ_k, repeat (Frankle &
  Carbin 2019; Frankle et al. 2020).
- :class:`GradualPruner`, :class:`DenseSparseDense` (``during_training``): pruners the training
  loop steps (``winnow.train(..., pruner=...)``): Zhu & Gupta 2017's polynomial schedule, and
  dense-sparse-dense / iterative hard thresholding phases (Han et al. 2017; Jin et al. 2016).
- One-shot pruning after training is :func:`prune_at_init` applied to a trained model
  (``rounds=1``), then fine-tuning with ``winnow.train(..., masks=...)``.
"""

from winnow.schedules.at_init import DEFAULT_ROUNDS, LayerCollapseWarning, prune_at_init
from winnow.schedules.during_training import (
    DenseSparseDense,
    GradualPruner,
    magnitude_scores,
    polynomial_sparsity,
)
from winnow.schedules.lottery import (
    LotteryRound,
    iterative_magnitude_pruning,
    lottery_rates,
    magnitude_prune,
)

__all__ = [
    "DEFAULT_ROUNDS",
    "DenseSparseDense",
    "GradualPruner",
    "LayerCollapseWarning",
    "LotteryRound",
    "iterative_magnitude_pruning",
    "lottery_rates",
    "magnitude_prune",
    "magnitude_scores",
    "polynomial_sparsity",
    "prune_at_init",
]
