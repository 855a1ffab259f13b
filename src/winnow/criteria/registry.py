"""The registry of criteria: typed options, a private copy to score, and the public entry point.

A criterion is a function ``implementation(work, params, data, options, state)`` that scores
``params`` (name -> parameter of ``work``) and returns scores (name -> tensor, higher = kept).
It is registered with a frozen dataclass of its options (validated when built; an unknown
option is an error that lists the valid ones), whether it needs data, and, for a criterion
that keeps something between calls on the same copy (SynFlow's linearised network), the class
of that state, made fresh for every copy. Criteria are pure: ``work`` is a private copy of the
caller's model (:class:`Scoring`), nothing is set on it beyond what the criterion computes
with, and all the criterion keeps between calls is in ``state``.

The registry answers what a configuration or the command line needs to know:
:meth:`Criterion.takes_seed`, :attr:`Criterion.needs_data`, :meth:`Criterion.option_names`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from winnow.core.masks import Masks
from winnow.core.prunable import prunable_parameters
from winnow.core.scores import check_finite

Implementation = Callable[..., Mapping[str, Tensor]]


@dataclass(frozen=True)
class NoOptions:
    """The options of a criterion that takes none."""


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: its implementation, its options class, what it needs."""

    name: str
    implementation: Implementation
    options: type
    needs_data: bool
    state: type | None = None
    reads_only: bool = False
    """Whether the criterion only reads the weights (magnitude, random): it can score a live
    model without a private copy."""

    def option_names(self) -> list[str]:
        """The names of the criterion's options, in declaration order."""
        return [f.name for f in dataclasses.fields(self.options)]

    def takes_seed(self) -> bool:
        """Whether the criterion draws randomly (random scores, sampled data) from a ``seed``."""
        return "seed" in self.option_names()

    def make_options(self, options: Any = None, /, **values: Any) -> Any:
        """The criterion's options: an instance of its options class (returned as is), or
        built from ``values``; ``ValueError`` for an unknown option, listing the valid ones."""
        if options is not None:
            if values or not isinstance(options, self.options):
                raise TypeError(
                    f"criterion {self.name!r} takes a {self.options.__name__} or keyword options"
                )
            return options
        unknown = sorted(set(values) - set(self.option_names()))
        if unknown:
            valid = ", ".join(self.option_names()) or "none"
            raise ValueError(
                f"criterion {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options: {valid}"
            )
        return self.options(**values)

    def new_state(self) -> Any:
        """A fresh state for one private copy (None for criteria that keep nothing)."""
        return None if self.state is None else self.state()


REGISTRY: dict[str, Criterion] = {}


def available() -> list[str]:
    """Names of the registered criteria."""
    return sorted(REGISTRY)


def lookup(method: str | Criterion) -> Criterion:
    """The registered criterion ``method``; ``ValueError`` listing the names if unknown."""
    if isinstance(method, Criterion):
        return method
    if method not in REGISTRY:
        raise ValueError(f"unknown criterion {method!r}; available: {', '.join(available())}")
    return REGISTRY[method]


def working_copy(
    model: nn.Module, names: Iterable[str] | None = None
) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A deep copy of ``model`` to score, and its parameters to score by name.

    Only those parameters require gradients on the copy. Names are validated on the caller's
    model first, so errors name the caller's parameters.
    """
    names = list(names) if names is not None else None
    prunable_parameters(model, names)
    work = copy.deepcopy(model)
    params = prunable_parameters(work, names)
    for param in work.parameters():
        param.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    return work, params


class Scoring:
    """A criterion bound to a private copy of a model: score it, prune it, score it again.

    ``work`` is the copy (pruned weights zeroed when ``masks`` is given) and ``params`` its
    parameters to score; a NaN or infinite parameter of the copy raises
    :class:`~winnow.core.scores.NonFiniteError` naming it; ``state`` is what the criterion
    keeps between calls on this copy.
    Iterative pruning scores one :class:`Scoring` round after round, zeroing the weights it
    removes in ``params`` (:class:`winnow.schedules.Pruner`); the caller's model is never
    touched.
    """

    def __init__(
        self,
        criterion: str | Criterion,
        model: nn.Module,
        data: Any = None,
        options: Any = None,
        *,
        names: Iterable[str] | None = None,
        masks: Masks | None = None,
    ) -> None:
        self.criterion = lookup(criterion)
        if self.criterion.needs_data and data is None:
            raise ValueError(
                f"criterion {self.criterion.name!r} needs data (a DataSplits, (x, y) or batches)"
            )
        self.options = self.criterion.make_options(options)
        if names is None and masks is not None:
            names = list(masks)
        self.work, self.params = working_copy(model, names)
        if masks is not None:
            masks.apply(self.work)
        check_finite(dict(self.work.named_parameters()), "weights")
        self.data = data
        self.state = self.criterion.new_state()

    def scores(self) -> Mapping[str, Tensor]:
        """The criterion's scores of the copy as it is now (higher = keep)."""
        return self.criterion.implementation(
            self.work, self.params, self.data, self.options, self.state
        )


def score_copy(
    criterion: str | Criterion,
    model: nn.Module,
    data: Any = None,
    *,
    names: Iterable[str] | None = None,
    masks: Masks | None = None,
    **values: Any,
) -> dict[str, Tensor]:
    """Scores of a private copy of ``model`` by ``criterion`` with options ``values``,
    detached and formed (what :func:`winnow.score` returns)."""
    criterion = lookup(criterion)
    scoring = Scoring(
        criterion, model, data, criterion.make_options(**values), names=names, masks=masks
    )
    scores = scoring.scores()
    return {n: scores[n].detach() for n in scoring.params}


def register(
    name: str,
    options: type = NoOptions,
    needs_data: bool = False,
    state: type | None = None,
    reads_only: bool = False,
) -> Callable[[Implementation], Callable[..., dict[str, Tensor]]]:
    """Register ``implementation(work, params, data, options, state)`` as criterion ``name``.

    ``options`` is a frozen dataclass of the criterion's options (validated in its
    ``__post_init__``); ``state`` the class of what it keeps between calls on one copy;
    ``reads_only`` says that it only reads the weights (no copy is needed to score). The
    decorated name becomes the public function ``(model, data=None, *, names=None, masks=None,
    **options) -> {name: detached scores}``, which scores a private copy.
    """
    if not (dataclasses.is_dataclass(options) and isinstance(options, type)):
        raise TypeError(f"the options of criterion {name!r} must be a dataclass")

    def decorator(fn: Implementation) -> Callable[..., dict[str, Tensor]]:
        if name in REGISTRY:
            raise ValueError(f"a criterion named {name!r} is already registered")
        criterion = Criterion(name, fn, options, needs_data, state, reads_only)
        REGISTRY[name] = criterion

        @functools.wraps(fn)
        def public(
            model: nn.Module,
            data: Any = None,
            *,
            names: Iterable[str] | None = None,
            masks: Masks | None = None,
            **values: Any,
        ) -> dict[str, Tensor]:
            return score_copy(criterion, model, data, names=names, masks=masks, **values)

        return public

    return decorator
