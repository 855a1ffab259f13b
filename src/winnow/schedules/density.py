"""Density schedules: when a :class:`~winnow.schedules.Pruner` prunes, and to what density.

A schedule answers, for a step ``iteration`` and the masks in force (``None``: nothing pruned
yet), either ``None`` (no pruning now) or a :class:`Target`: the density to keep (a fraction of
all weights, or one per tensor) and whether it is chosen among the weights still alive (weights
pruned once stay pruned) or afresh among all. The schedules of the literature:

- :class:`OneShot`: one density at one step (pruning at initialisation, or after training).
- :class:`ExponentialRounds`: n rounds at densities s·(d/s)^(k/n), k = 1..n (SynFlow, Tanaka et
  al. 2020; any criterion iterated).
- :class:`Gradual`: Zhu & Gupta 2017's cubic schedule every Δt steps from t₀ to t₀ + nΔt.
- :class:`PruneRate`: remove a fraction of the weights still alive at every step, per tensor or
  globally (iterative magnitude pruning, Frankle & Carbin 2019).
- :class:`Phases`: dense and sparse phases starting at given steps, each mask chosen afresh
  (dense-sparse-dense, Han et al. 2017; iterative hard thresholding, Jin et al. 2016).

All densities are fractions kept, in [0, 1]; :class:`Gradual` takes sparsities (fractions
removed) as its paper does, and :class:`PruneRate` the fraction removed per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from winnow.core.densities import (
    check_density,
    check_scope,
    check_sparsity,
    exponential_densities,
)
from winnow.core.masks import Masks


@dataclass(frozen=True)
class Target:
    """Keep ``density`` of the weights (of all of them, or of each tensor for a mapping);
    ``cumulative``: among the weights still alive (else chosen afresh among all)."""

    density: float | Mapping[str, float]
    cumulative: bool = True


class DensitySchedule(Protocol):
    """What a :class:`~winnow.schedules.Pruner` asks of its schedule. A schedule whose targets
    are relative to the weights alive also sets ``relative = True``: it is then given all-kept
    masks before the first pruning step."""

    def target(self, iteration: int, current: Masks | None) -> Target | None:
        """The target at ``iteration`` given the masks in force, or None (no pruning now)."""
        ...

    def iterations(self) -> list[int] | None:
        """The steps at which it prunes, in order; None if it prunes whenever it is asked."""
        ...


@dataclass(frozen=True)
class OneShot:
    """Prune once, to ``density`` (kept), at step ``at``; a mapping name -> density gives each
    tensor its own (e.g. from :func:`winnow.core.distributions.layer_densities`: random-ERK)."""

    density: float | Mapping[str, float]
    at: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.density, Mapping):
            for name, value in self.density.items():
                check_density(value, f"the density of {name!r}")
        else:
            check_density(self.density)

    def target(self, iteration: int, current: Masks | None) -> Target | None:
        return Target(self.density) if iteration == self.at else None

    def iterations(self) -> list[int]:
        return [self.at]


def exponential_targets(density: float, rounds: int, start: float = 1.0) -> list[float]:
    """s·(d/s)^(k/n) for k = 1..n: from density s (the starting mask's) to d over n rounds
    (:func:`winnow.core.exponential_densities` of the ratio d/s, scaled by s)."""
    check_density(density)
    if density > start:
        raise ValueError(f"density {density} is above the starting mask's density {start:.4g}")
    ratio = density / start if start else 0.0
    return [start * d for d in exponential_densities(ratio, rounds)]


@dataclass(frozen=True)
class ExponentialRounds:
    """``rounds`` rounds, at steps 0..n-1, to the densities s·(d/s)^(k/n) (Tanaka et al. 2020:
    the density falls by the same factor each round); ``start`` is the density of the mask
    the rounds start from (1 for a dense network)."""

    density: float
    rounds: int
    start: float = 1.0
    targets: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        targets = exponential_targets(self.density, self.rounds, self.start)
        object.__setattr__(self, "targets", tuple(targets))

    def target(self, iteration: int, current: Masks | None) -> Target | None:
        if 0 <= iteration < self.rounds:
            return Target(self.targets[iteration])
        return None

    def iterations(self) -> list[int]:
        return list(range(self.rounds))


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


@dataclass(frozen=True)
class Gradual:
    """Zhu & Gupta 2017, "To prune, or not to prune": prune at t = ``begin`` + j·``frequency``
    for j = 0..n, n = (``end`` − ``begin``) / ``frequency`` (a whole number), to the sparsity
    :func:`polynomial_sparsity` gives; the last step, at ``end``, reaches
    ``final_sparsity`` exactly. Sparsities are fractions removed, in [0, 1)."""

    final_sparsity: float
    begin: int
    end: int
    frequency: int
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        check_sparsity(self.final_sparsity)
        check_sparsity(self.initial_sparsity)
        if self.frequency < 1 or self.begin < 0 or self.end < self.begin:
            raise ValueError(
                f"need 0 <= begin <= end and frequency >= 1, got begin={self.begin}, "
                f"end={self.end}, frequency={self.frequency}"
            )
        if (self.end - self.begin) % self.frequency:
            raise ValueError(
                f"end - begin ({self.end - self.begin}) must be a multiple of the frequency "
                f"({self.frequency}) so that the last pruning step reaches the final sparsity"
            )

    @property
    def steps(self) -> int:
        return (self.end - self.begin) // self.frequency

    def sparsity(self, iteration: int) -> float:
        """The target sparsity at ``iteration``."""
        return polynomial_sparsity(
            iteration, self.final_sparsity, self.begin, self.steps, self.frequency,
            self.initial_sparsity,
        )  # fmt: skip

    def target(self, iteration: int, current: Masks | None) -> Target | None:
        if iteration < self.begin or iteration > self.end:
            return None
        if (iteration - self.begin) % self.frequency:
            return None
        return Target(1.0 - self.sparsity(iteration))

    def iterations(self) -> list[int]:
        return list(range(self.begin, self.end + 1, self.frequency))


def pruned_count(rate: float, alive: int) -> int:
    """How many of ``alive`` weights a rate removes: rate·alive rounded half up (a rate of 0.5
    on 3 weights removes 2, never a float artefact)."""
    return min(alive, int(math.floor(rate * alive + 0.5)))


@dataclass(frozen=True)
class PruneRate:
    """Remove ``rate`` of the weights still alive at every step (a sparsity step, 0.2: keep
    80% of them): per tensor (``scope="layer"``; one rate, or a mapping name -> rate such as
    :func:`winnow.schedules.lottery_rates`) or ranked globally (``scope="global"``, one rate).
    The iterative magnitude pruning of Frankle & Carbin 2019, one step per round."""

    rate: float | Mapping[str, float]
    scope: str = "layer"
    relative = True

    def __post_init__(self) -> None:
        check_scope(self.scope)
        if isinstance(self.rate, Mapping):
            if self.scope == "global":
                raise ValueError("global magnitude pruning takes one rate, not a rate per layer")
            for value in self.rate.values():
                check_sparsity(value)
        else:
            check_sparsity(self.rate)

    def target(self, iteration: int, current: Masks | None) -> Target:
        if current is None:
            raise ValueError("PruneRate needs the masks in force (all kept at the start)")
        alive = {n: int(m.count_nonzero()) for n, m in current.items()}
        if self.scope == "global":
            total = sum(alive.values())
            return Target((total - pruned_count(self.rate, total)) / current.numel())
        if isinstance(self.rate, Mapping):
            unknown = sorted(set(self.rate) - set(current))
            missing = sorted(set(current) - set(self.rate))
            if unknown or missing:
                raise ValueError(
                    "per-layer rates must name exactly the masked tensors; "
                    f"unknown: {unknown}, missing: {missing}"
                )
            rates = dict(self.rate)
        else:
            rates = dict.fromkeys(current, self.rate)
        return Target(
            {
                n: (alive[n] - pruned_count(rates[n], alive[n])) / mask.numel()
                for n, mask in current.items()
            }
        )

    def iterations(self) -> None:
        return None


@dataclass(frozen=True)
class Phases:
    """Alternating dense and sparse phases (Han et al. 2017; Jin et al. 2016): ``phases``
    lists ``(start_iteration, density)`` in increasing order of start; at each start the mask
    is chosen afresh among all weights (a density of 1 restores every weight, from 0.0)."""

    phases: tuple[tuple[int, float], ...]

    def __init__(self, phases: Sequence[tuple[int, float]]) -> None:
        if not phases:
            raise ValueError("give at least one (start_iteration, density) phase")
        starts = [int(s) for s, _ in phases]
        if starts != sorted(set(starts)) or starts[0] < 0:
            raise ValueError(f"phase starts must be increasing and >= 0, got {starts}")
        object.__setattr__(self, "phases", tuple((int(s), check_density(d)) for s, d in phases))

    def target(self, iteration: int, current: Masks | None) -> Target | None:
        for start, density in self.phases:
            if start == iteration:
                return Target(density, cumulative=False)
        return None

    def iterations(self) -> list[int]:
        return [start for start, _ in self.phases]
