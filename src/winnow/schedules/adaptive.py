"""A pruning rate that adapts to the generalisation loss (after Prechelt 1997, "Connection
pruning with static and adaptive pruning schedules", Neurocomputing 16, 49-61).

Prechelt measures overfitting by the generalisation loss

    GL(t) = 100 · (E_va(t) / E_opt(t) − 1),    E_opt(t) = min_{t' ≤ t} E_va(t'),

the validation error at the t-th evaluation relative to the lowest one so far, in percent (0
while validation improves), and his adaptive method (lprune) sets the pruning strength, the
fraction of the weights removed at a pruning step, from it.

**The rule implemented here is an adaptation, not the paper's rule**: lprune's exact
formula (which also uses the weights' saliencies) is not reproduced. :class:`AdaptiveRate`
removes, at the first pruning opportunity after every evaluation, the fraction

    p(t) = p_min + (p_max − p_min) · min(1, GL(t) / GL_max)

of the weights still alive (per tensor or globally, counted as :class:`PruneRate` counts:
round(p · alive), half up): p_min while validation improves, rising linearly with the
generalisation loss to p_max at GL_max percent. Feed it the validation loss with
:meth:`AdaptiveRate.observe`, or let :func:`winnow.train` do it through the callback
:meth:`AdaptiveRate.callback` (its ``after_eval`` reads the row's ``val_loss``).
"""

from __future__ import annotations

import math

from torch import nn

from winnow.core.densities import check_scope, check_sparsity
from winnow.core.masks import Masks
from winnow.schedules.density import PruneRate, Target
from winnow.training import Callback


def generalisation_loss(validation: float, best: float) -> float:
    """GL = 100·(E_va / E_opt − 1) (Prechelt): percent by which the validation error exceeds
    the lowest so far (0 when both are 0; infinite when only the best is 0)."""
    if best == 0:
        return 0.0 if validation == 0 else math.inf
    return 100.0 * (validation / best - 1.0)


class AdaptiveRate:
    """Remove p(t) = p_min + (p_max − p_min)·min(1, GL(t)/GL_max) of the weights alive once
    after each observed validation loss (see the module's docstring: an adaptation of
    Prechelt 1997's lprune, not its exact rule).

    - ``max_rate`` (p_max), ``min_rate`` (p_min): fractions removed, 0 <= p_min <= p_max < 1.
    - ``gl_max``: the generalisation loss, in percent, at which the rate reaches p_max (> 0).
    - ``scope``: ``"layer"`` (the rate per tensor) or ``"global"`` (ranked over all of them).

    The schedule is stateful: :meth:`observe` records a validation loss (GL and the rate are
    computed from it) and arms one pruning step, which the next :meth:`target` call takes;
    before the first observation and between a step and the next observation, :meth:`target`
    answers None. :meth:`reset` forgets the observations. Its targets are relative to the
    weights alive (``relative = True``) and it prunes whenever asked (``iterations()`` is
    None).
    """

    relative = True

    def __init__(
        self,
        max_rate: float,
        min_rate: float = 0.0,
        gl_max: float = 5.0,
        scope: str = "layer",
    ) -> None:
        check_sparsity(max_rate)
        check_sparsity(min_rate)
        if min_rate > max_rate:
            raise ValueError(f"min_rate ({min_rate}) must not exceed max_rate ({max_rate})")
        if not gl_max > 0 or math.isinf(gl_max):
            raise ValueError(f"gl_max must be a finite number > 0 (percent), got {gl_max!r}")
        check_scope(scope)
        self.max_rate, self.min_rate = float(max_rate), float(min_rate)
        self.gl_max, self.scope = float(gl_max), scope
        self.reset()

    def reset(self) -> None:
        """Forget every observation (the best validation loss, GL and the armed step)."""
        self.best: float | None = None
        self.gl = 0.0
        self.observations = 0
        self.pending = False
        self.rates: list[float] = []  # the rate of every step taken, in order

    def rate_for(self, gl: float) -> float:
        """p = p_min + (p_max − p_min)·min(1, max(GL, 0)/GL_max)."""
        share = min(1.0, max(gl, 0.0) / self.gl_max)
        return self.min_rate + (self.max_rate - self.min_rate) * share

    @property
    def rate(self) -> float:
        """The rate the next step removes (from the last observed GL)."""
        return self.rate_for(self.gl)

    def observe(self, validation_loss: float) -> float:
        """Record a validation loss (or error) E_va >= 0: update E_opt and GL, arm one pruning
        step; returns GL."""
        value = float(validation_loss)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a validation loss must be finite and >= 0, got {validation_loss!r}")
        self.best = value if self.best is None else min(self.best, value)
        self.gl = generalisation_loss(value, self.best)
        self.observations += 1
        self.pending = True
        return self.gl

    def target(self, iteration: int, current: Masks | None) -> Target | None:
        if not self.pending:
            return None
        if current is None:
            raise ValueError("AdaptiveRate needs the masks in force (all kept at the start)")
        rate = self.rate
        self.pending = False
        self.rates.append(rate)
        return PruneRate(rate, self.scope).target(iteration, current)

    def iterations(self) -> None:
        return None

    def callback(self, key: str = "val_loss") -> ObserveValidation:
        """A :class:`~winnow.training.Callback` whose ``after_eval`` observes ``row[key]``."""
        return ObserveValidation(self, key)

    def __repr__(self) -> str:
        return (
            f"AdaptiveRate(max_rate={self.max_rate:g}, min_rate={self.min_rate:g}, "
            f"gl_max={self.gl_max:g}, scope={self.scope!r})"
        )


class ObserveValidation(Callback):
    """Feeds ``row[key]`` of every evaluation of :func:`winnow.train` to an
    :class:`AdaptiveRate`; ``key`` names a loss or an error, lower being better (default the
    validation split's loss, ``"val_loss"``)."""

    def __init__(self, schedule: AdaptiveRate, key: str = "val_loss") -> None:
        self.schedule, self.key = schedule, key

    def after_eval(self, row: dict, model: nn.Module) -> None:
        value = row.get(self.key)
        if value is None:
            present = sorted(k for k, v in row.items() if v is not None)
            raise ValueError(
                f"the evaluation row has no {self.key!r} (evaluate a validation split, or name "
                f"one of {present})"
            )
        self.schedule.observe(value)
