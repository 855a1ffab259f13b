"""One-shot and iterative pruning without training in between: at initialisation, or once a
network is trained.

Score the network, keep the top weights, and (with ``rounds`` > 1) repeat with the pruned
network at the densities s·(d/s)^(k/n) (SynFlow's schedule, any criterion). Both entry points
are a :class:`~winnow.schedules.Pruner` with a :class:`~winnow.schedules.density.OneShot` or
:class:`~winnow.schedules.density.ExponentialRounds` schedule, run on a private copy.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from winnow.core.densities import check_density
from winnow.core.masks import Masks
from winnow.criteria.registry import lookup
from winnow.schedules.density import ExponentialRounds
from winnow.schedules.pruner import Pruner

DEFAULT_ROUNDS = {"synflow": 100}
"""Rounds used when ``rounds`` is not given (1 for every other criterion)."""


class LayerCollapseWarning(UserWarning):
    """A pruning step left a layer with no weight: in a chain of layers the network can no
    longer pass a signal (an emptied residual shortcut only cuts that path)."""


def prune_at_init(
    model: nn.Module,
    method: str,
    density: float,
    data: Any = None,
    rounds: int | None = None,
    scope: str = "global",
    min_per_layer: int = 0,
    masks: Masks | None = None,
    progress: bool = False,
    **options: Any,
) -> Masks:
    """Masks keeping a fraction ``density`` of the prunable weights, chosen before training.

    Scores the network with the criterion ``method`` (``random``, ``magnitude``, ``snip``,
    ``grasp``, ``synflow``, ...; see :func:`winnow.criteria.score`) and keeps the top weights
    (``scope="global"`` or ``"layer"``). With ``rounds`` > 1 it prunes iteratively: round k
    re-scores the network pruned so far and keeps s·(d/s)^(k/n) of the weights (Tanaka et al.
    2020; SynFlow defaults to 100 rounds, every other criterion to 1; s is the density of
    ``masks``, 1 without). ``masks`` starts from an existing mask instead of the dense
    network. ``min_per_layer`` keeps at least that many weights in every tensor; a layer left
    empty raises a :class:`LayerCollapseWarning` naming it. ``model`` is not changed.

    Args:
        density: the fraction kept, in [0, 1].
        options: the criterion's options (for example ``samples``, ``temperature``, ``seed``).
    """
    criterion = lookup(method)
    check_density(density)
    rounds = DEFAULT_ROUNDS.get(criterion.name, 1) if rounds is None else rounds
    start = 1.0 if masks is None else masks.density()
    pruner = Pruner(
        criterion,
        ExponentialRounds(density, rounds, start),
        scope=scope,
        data=data,
        options=options,
        masks=masks,
        min_per_layer=min_per_layer,
    )
    pruned = pruner.prune(model, progress=progress)
    collapsed = pruned.collapsed_layers()
    if collapsed:
        warnings.warn(
            f"{method} at density {density:.4g} left no weight in {', '.join(collapsed)} "
            "(layer collapse); pass min_per_layer=1 to keep every layer connected",
            LayerCollapseWarning,
            stacklevel=2,
        )
    return pruned


def prune_after_training(
    model: nn.Module,
    method: str,
    density: float,
    data: Any = None,
    rounds: int = 1,
    scope: str = "global",
    min_per_layer: int = 0,
    masks: Masks | None = None,
    progress: bool = False,
    **options: Any,
) -> Masks:
    """Masks keeping a fraction ``density`` of a *trained* network's prunable weights (then
    fine-tune with ``winnow.train(..., masks=...)``; Han et al. 2015, LeCun et al. 1990).

    The same pipeline as :func:`prune_at_init` (one round by default, whatever the criterion):
    ``magnitude``, ``obd``, ``woodfisher``, ``taylor`` or any registered criterion, globally or
    per layer. For the OBS update of the remaining weights use
    :func:`winnow.schedules.obs_prune`. ``model`` is not changed.
    """
    return prune_at_init(
        model, method, density, data, rounds, scope, min_per_layer, masks, progress, **options
    )
