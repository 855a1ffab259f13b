"""The registry of criteria and the wrapper that keeps the caller's model untouched."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from winnow.masks import Masks, prunable_parameters

ScoreFunction = Callable[..., dict[str, Tensor]]


@dataclass(frozen=True)
class Criterion:
    name: str
    function: ScoreFunction
    needs_data: bool


REGISTRY: dict[str, Criterion] = {}


def available() -> list[str]:
    """Names of the registered criteria."""
    return sorted(REGISTRY)


def register(name: str, needs_data: bool = False) -> Callable[[ScoreFunction], ScoreFunction]:
    """Register a criterion implemented on a private copy of the model.

    The decorated function is called as ``fn(work, params, data, **options)`` where ``work`` is
    a deep copy of the caller's model (pruned weights zeroed when ``masks`` is given) that it
    may change freely, and ``params`` maps the names to score to ``work``'s parameters. The
    registered function has the public signature ``(model, data=None, *, names=None,
    masks=None, **options)`` and returns detached scores keyed by name.
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
            prunable_parameters(model, names)  # validate on the caller's model: clear errors
            work = copy.deepcopy(model)
            params = prunable_parameters(work, names)
            if masks is not None:
                masks.apply(work)
            for param in work.parameters():
                param.requires_grad_(False)
            for param in params.values():
                param.requires_grad_(True)
            scores = fn(work, params, data, **options)
            return {n: scores[n].detach() for n in params}

        REGISTRY[name] = Criterion(name, wrapper, needs_data)
        return wrapper

    return decorator
