"""Schedules: when to score and select, as one :class:`Pruner` (stage 5).

A :class:`Pruner` combines a criterion (:mod:`winnow.criteria`), a density schedule
(:mod:`winnow.schedules.density`: :class:`OneShot`, :class:`ExponentialRounds`,
:class:`Gradual`, :class:`PruneRate`, :class:`Phases`), a scope and optionally an update rule;
``pruner.step(iteration, model)`` returns new masks when the schedule prunes. Every method of
the literature is one of them:

- :func:`prune_at_init` / :func:`prune_after_training` (``at_init``): before training, or once
  trained, one-shot or iterative over rounds at the densities s·(d/s)^(k/n) (SNIP, GraSP,
  SynFlow; magnitude, OBD, WoodFisher, Taylor).
- :func:`iterative_magnitude_pruning` (``lottery``): train, prune a fraction of the remaining
  weights by magnitude, reset the survivors to θ₀ or rewind them to θ_k, repeat (Frankle &
  Carbin 2019; Frankle et al. 2020).
- :class:`GradualPruner`, :class:`DenseSparseDense` (``during_training``): pruners the
  training loop steps (``winnow.train(..., pruner=...)``): Zhu & Gupta 2017's polynomial
  schedule, and dense-sparse-dense / iterative hard thresholding phases (Han et al. 2017; Jin
  et al. 2016).
- :class:`DynamicSparsity` (``growth``): sparse training from scratch that drops and grows
  at a fixed budget: SET (random growth), RigL (growth by the dense gradient), SNFS-style
  momentum growth, over uniform, Erdős–Rényi or ERK layer densities.
- :func:`obs_prune` (``obs``): WoodFisher scores with the OBS update of the remaining weights
  (Hassibi & Stork 1992; Singh & Alistarh 2020).
"""

from winnow.schedules.adaptive import AdaptiveRate, ObserveValidation
from winnow.schedules.at_init import (
    DEFAULT_ROUNDS,
    LayerCollapseWarning,
    prune_after_training,
    prune_at_init,
)
from winnow.schedules.density import (
    DensitySchedule,
    ExponentialRounds,
    Gradual,
    OneShot,
    Phases,
    PruneRate,
    Target,
    polynomial_sparsity,
)
from winnow.schedules.during_training import DenseSparseDense, GradualPruner
from winnow.schedules.growth import DropGrow, DynamicSparsity, rigl_pruner, set_pruner
from winnow.schedules.lottery import (
    LotteryRound,
    iterative_magnitude_pruning,
    lottery_rates,
    magnitude_prune,
)
from winnow.schedules.obs import obs_prune, obs_update_rule
from winnow.schedules.pruner import Pruner, UpdateRule

__all__ = [
    "AdaptiveRate",
    "DEFAULT_ROUNDS",
    "DenseSparseDense",
    "DropGrow",
    "DynamicSparsity",
    "DensitySchedule",
    "ExponentialRounds",
    "Gradual",
    "GradualPruner",
    "LayerCollapseWarning",
    "LotteryRound",
    "ObserveValidation",
    "OneShot",
    "Phases",
    "PruneRate",
    "Pruner",
    "Target",
    "UpdateRule",
    "iterative_magnitude_pruning",
    "lottery_rates",
    "magnitude_prune",
    "obs_prune",
    "obs_update_rule",
    "polynomial_sparsity",
    "prune_after_training",
    "prune_at_init",
    "rigl_pruner",
    "set_pruner",
]
