"""The Pruner: one criterion, one density schedule, one scope; every pruning method of winnow.

A :class:`Pruner` is built from

- a **criterion**: a registered name (``"snip"``), a :class:`~winnow.criteria.Criterion`, or a
  function ``model -> scores``; with its options (a dict or the criterion's options class);
- a **density schedule** (:mod:`winnow.schedules.density`): when to prune and to what density;
- a **scope**: ``"global"`` (one threshold across tensors) or ``"layer"`` (the same density in
  every tensor); a schedule that gives one density per tensor implies per-layer selection;
- optionally an **update rule** applied after each selection (the OBS update of the remaining
  weights, :func:`winnow.schedules.obs.obs_update_rule`).

It is driven like a learning-rate scheduler (and like ``torch.ao.pruning``'s sparsifiers):
``step(iteration, model)`` scores the model as it is now and returns new masks when the
schedule prunes at that step, ``None`` otherwise. :func:`winnow.train` calls it before the
first step and after every step, and enforces the masks it returns; any loop can do the same.
For a schedule that needs no training between its steps (pruning at initialisation, one-shot
pruning after training), :meth:`Pruner.prune` runs every step at once on a private copy of the
model: the copy is scored, the weights removed in a round are zeroed in it, and the next round
scores the pruned copy (iterative SynFlow), with the survivors tracked by the top-k engine so
each round costs in proportion to the weights still alive.

Every schedule of the literature is one of these (:mod:`winnow.schedules`):
:func:`~winnow.schedules.prune_at_init` and :func:`~winnow.schedules.prune_after_training`
(:class:`OneShot` or :class:`ExponentialRounds` with :meth:`Pruner.prune`),
:class:`~winnow.schedules.GradualPruner`, :class:`~winnow.schedules.DenseSparseDense`,
iterative magnitude pruning (:class:`PruneRate`, one step per round) and
:func:`~winnow.schedules.obs_prune`. A new method plugs in as a criterion, a schedule or an
update rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from winnow.core._topk import Survivors, zero_removed
from winnow.core.densities import check_scope
from winnow.core.masks import Masks
from winnow.core.nm import input_dims, is_pattern, parse_pattern
from winnow.core.prunable import prunable_parameters, unwrap
from winnow.core.scores import check_finite
from winnow.core.selection import select
from winnow.criteria.registry import Criterion, Scoring, lookup
from winnow.schedules.density import DensitySchedule

ScoreFunction = Callable[[nn.Module], Mapping[str, Tensor]]
"""A criterion given as a plain function of the model (higher = keep)."""


class UpdateRule(Protocol):
    """Called after a selection on the pruner's private copy: may move the weights still kept
    (the removed ones are zeroed afterwards). ``scoring`` holds the copy, its parameters and
    the criterion's state (e.g. the Fisher inverses WoodFisher computed)."""

    def __call__(self, scoring: Scoring, before: Masks | None, after: Masks) -> None: ...


class Pruner:
    """Prunes with ``criterion`` to the densities of ``schedule``, within ``scope``.

    Args:
        criterion: a registered name, a :class:`~winnow.criteria.Criterion`, or a function
            ``model -> scores``.
        schedule: a density schedule (:mod:`winnow.schedules.density`).
        scope: ``"global"``, ``"layer"``, or an N:M pattern (``"2:4"``: the top N of every M
            consecutive weights along each input dimension; the schedule's densities must then
            be N/M, e.g. ``OneShot(0.5)`` for 2:4).
        data: what data-driven criteria score with (a DataSplits, ``(x, y)`` or batches).
        options: the criterion's options (a mapping, or an instance of its options class).
        names: the parameters to prune (default: the prunable weights, or those of ``masks``).
        masks: the masks in force at the start (weights pruned there stay pruned).
        min_per_layer: keep at least this many weights in every tensor.
        update: an :class:`UpdateRule` applied after each selection by :meth:`prune`.

    ``masks`` is the mask in force after the last pruning step (``None`` before the first);
    ``start`` the mask it started from.
    """

    def __init__(
        self,
        criterion: str | Criterion | ScoreFunction = "magnitude",
        schedule: DensitySchedule | None = None,
        *,
        scope: str = "global",
        data: Any = None,
        options: Mapping[str, Any] | Any = None,
        names: Iterable[str] | None = None,
        masks: Masks | None = None,
        min_per_layer: int = 0,
        update: UpdateRule | None = None,
    ) -> None:
        if schedule is None:
            raise ValueError("a Pruner needs a density schedule (see winnow.schedules.density)")
        if is_pattern(scope):
            parse_pattern(scope)  # a malformed pattern fails here, not at the first step
        else:
            check_scope(scope)
        if min_per_layer < 0:
            raise ValueError(f"min_per_layer must be >= 0, got {min_per_layer}")
        if callable(criterion) and not isinstance(criterion, Criterion):
            self.criterion, self.score_function = None, criterion
            if options:
                raise ValueError("a criterion given as a function takes no options")
            self.options = None
        else:
            self.criterion, self.score_function = lookup(criterion), None
            if isinstance(options, Mapping):
                self.options = self.criterion.make_options(**options)
            else:
                self.options = self.criterion.make_options(options)
            if self.criterion.needs_data and data is None:
                raise ValueError(f"criterion {self.criterion.name!r} needs data")
        self.schedule = schedule
        self.scope = scope
        self.data = data
        if names is None and masks is not None:
            names = list(masks)
        self.names = list(names) if names is not None else None
        self.start = masks
        self.masks = masks
        self.min_per_layer = min_per_layer
        self.update = update

    def __repr__(self) -> str:
        if self.criterion is not None:
            name = self.criterion.name
        else:
            name = getattr(self.score_function, "__name__", "function")
        return f"Pruner({name}, {self.schedule!r}, scope={self.scope!r})"

    @property
    def end(self) -> int:
        """The last step at which the schedule prunes (0 if it prunes whenever asked)."""
        steps = self.schedule.iterations()
        return max(steps) if steps else 0

    # -- pruning a live model ----------------------------------------------------------------
    def step(self, iteration: int, model: nn.Module) -> Masks | None:
        """Score ``model`` as it is now and select, if the schedule prunes at ``iteration``;
        returns the new masks (also kept in :attr:`masks`), else None. ``model`` is not
        changed: enforcing the masks is the training loop's job (:func:`winnow.enforce`)."""
        target = self.schedule.target(iteration, self._current(model, self.masks))
        if target is None:
            return None
        scores = self._score_live(model)
        current = self.masks if target.cumulative else None
        self.masks = select(
            scores, target.density, self.scope, current=current,
            min_per_layer=self.min_per_layer, input_dims=input_dims(unwrap(model), scores),
        )  # fmt: skip
        return self.masks

    def __call__(self, iteration: int, model: nn.Module) -> Masks | None:
        """The same as :meth:`step` (a pruner is also a function of the step and the model)."""
        return self.step(iteration, model)

    def _current(self, model: nn.Module, masks: Masks | None) -> Masks | None:
        """The masks in force, for the schedule: all kept before the first pruning step when
        its targets are relative to the weights alive."""
        if masks is None and getattr(self.schedule, "relative", False):
            return Masks.ones(model, self.names)
        return masks

    def _score_live(self, model: nn.Module) -> Mapping[str, Tensor]:
        if self.score_function is not None:
            return self.score_function(model)
        criterion = self.criterion
        if criterion.reads_only:  # magnitude, random: no private copy needed
            params = prunable_parameters(model, self.names)
            check_finite(params, "weights")
            scores = criterion.implementation(model, params, self.data, self.options, None)
            return {n: scores[n].detach() for n in params}
        scoring = Scoring(
            criterion, model, self.data, self.options, names=self.names, masks=self.masks
        )
        scores = scoring.scores()
        return {n: scores[n].detach() for n in scoring.params}

    # -- pruning a private copy, every step at once --------------------------------------------
    def prune(self, model: nn.Module, progress: bool = False) -> Masks:
        """Run every step of the schedule on a private copy of ``model``, with no training in
        between; return the final masks (on the parameters' devices). ``model`` is not
        changed. See :meth:`pruned` for the pruned copy itself."""
        return self.pruned(model, progress)[1]

    def pruned(self, model: nn.Module, progress: bool = False) -> tuple[nn.Module, Masks]:
        """:meth:`prune`, returning the pruned private copy too (removed weights exactly 0.0,
        the others as the update rule left them)."""
        if self.criterion is None:
            raise ValueError("prune() scores a private copy: give the criterion by name")
        steps = self.schedule.iterations()
        if steps is None:
            raise ValueError(f"{self.schedule!r} prunes whenever asked: drive it with step()")
        scoring = Scoring(
            self.criterion, model, self.data, self.options, names=self.names, masks=self.start
        )
        params = scoring.params
        if is_pattern(self.scope):
            return self._pruned_to_pattern(scoring, steps, progress)
        devices = {n: p.device for n, p in params.items()}
        survivors = Survivors({n: p.shape for n, p in params.items()}, self.start)
        relative = getattr(self.schedule, "relative", False)
        current = self.start  # kept up to date only where something reads it
        from tqdm.auto import tqdm

        bar = tqdm(steps, desc=self.criterion.name, disable=None if progress else True, leave=False)
        for iteration in bar:
            target = self.schedule.target(iteration, self._current(scoring.work, current))
            if target is None:
                continue
            if not target.cumulative:  # chosen afresh: every weight is a candidate again
                survivors = Survivors({n: p.shape for n, p in params.items()})
            removed = survivors.select(
                scoring.scores(), target.density, self.scope, self.min_per_layer
            )
            if self.update is not None:
                before, current = current, survivors.masks(devices)
                with torch.no_grad():
                    self.update(scoring, before, current)
                current.apply(scoring.work)
                continue
            zero_removed(params, removed, survivors.strides)
            if relative:
                current = survivors.masks(devices)
        self.masks = survivors.masks(devices)
        return scoring.work, self.masks

    def _pruned_to_pattern(
        self, scoring: Scoring, steps: Iterable[int], progress: bool
    ) -> tuple[nn.Module, Masks]:
        """:meth:`pruned` for an N:M scope: each pruning step selects the pattern among the
        weights alive and zeroes the others in the copy."""
        dims = input_dims(scoring.work, scoring.params)
        current = self.start
        for iteration in steps:
            target = self.schedule.target(iteration, self._current(scoring.work, current))
            if target is None:
                continue
            scores = scoring.scores()
            formed = {n: scores[n].detach() for n in scoring.params}
            before = current if target.cumulative else None
            current = select(formed, target.density, self.scope, before, input_dims=dims)
            if self.update is not None:
                with torch.no_grad():
                    self.update(scoring, before, current)
            current.apply(scoring.work)
        if current is None:
            raise ValueError(f"{self.schedule!r} never pruned")
        self.masks = current
        return scoring.work, current
