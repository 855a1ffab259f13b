"""The registry of criteria and the copy that keeps the caller's model untouched."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from winnow.core.masks import Masks, prunable_parameters

ScoreFunction = Callable[..., dict[str, Tensor]]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: ``implementation(work, params, data, **options)`` scores a
    private working copy; ``function`` is the public, non-mutating entry point."""

    name: str
    implementation: ScoreFunction
    function: ScoreFunction
    needs_data: bool


REGISTRY: dict[str, Criterion] = {}


def available() -> list[str]:
    """Names of the registered criteria."""
    return sorted(REGISTRY)


def lookup(method: str) -> Criterion:
    """The registered criterion ``method``; ``ValueError`` listing the names if unknown."""
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


def register(name: str, needs_data: bool = False) -> Callable[[ScoreFunction], ScoreFunction]:
    """Register a criterion implemented on a private copy of the model.

    The decorated function is called as ``fn(work, params, data, **options)`` where ``work`` is
    a copy of the caller's model (pruned weights zeroed when ``masks`` is given) that it may
    change freely, and ``params`` maps the names to score to ``work``'s parameters. It may be
    called again on the same copy (iterative pruning re-scores one copy round after round), so
    whatever it does to the copy must be idempotent. The registered public function has the
    signature ``(model, data=None, *, names=None, masks=None, **options)`` and returns detached
    scores keyed by name.
    """

    def decorator(fn: ScoreFunction) -> ScoreFunction:
        if name in REGISTRY:
            raise ValueError(f"a criterion named {name!r} is already registered")

        @functools.wraps(fn)
        def wrapper(
            model: nn.Module,
            data=None,
            *,
            names=None,
            masks: Masks | None = None,
            **options,
        ) -> dict[str, Tensor]:
            if needs_data and data is None:
                raise ValueError(f"criterion {name!r} needs data (a DataSplits, (x, y) or batches)")
            if names is None and masks is not None:
                names = list(masks)
            work, params = working_copy(model, names)
            if masks is not None:
                masks.apply(work)
            scores = fn(work, params, data, **options)
            return {n: scores[n].detach() for n in params}

        REGISTRY[name] = Criterion(name, fn, wrapper, needs_data)
        return wrapper

    return decorator
