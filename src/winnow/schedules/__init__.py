"""Schedules: when to score and select.

- :func:`prune_at_init` (``at_init``): before training, one-shot or iterative over rounds at
  the densities d^(k/n) (SNIP, GraSP, SynFlow).
- :func:`iterative_magnitude_pruning` (``lottery``): train, prune a fraction of the remaining
  weights by magnitude, reset the survivors to θ₀ or rewind them to θ_k, repeat (Frankle &
  Carbin 2019; Frankle et al. 2020).
"""

from winnow.schedules.at_init import DEFAULT_ROUNDS, LayerCollapseWarning, prune_at_init
from winnow.schedules.lottery import (
    LotteryRound,
    iterative_magnitude_pruning,
    lottery_rates,
    magnitude_prune,
)

__all__ = [
    "DEFAULT_ROUNDS",
    "LayerCollapseWarning",
    "LotteryRound",
    "iterative_magnitude_pruning",
    "lottery_rates",
    "magnitude_prune",
    "prune_at_init",
]
