"""Criteria: how important is each prunable weight? Higher score = more important = kept.

Every criterion is registered under a name with a frozen dataclass of its options, so
configurations and the command line say ``"snip"`` and get the function, and a wrong option is
an error that lists the valid ones (:mod:`winnow.criteria.registry`). :func:`score` dispatches
by name; each registered name is also a function here (``criteria.snip(model, data, ...)``).

No criterion changes the model it is given: each works on a private copy (weights made
absolute for SynFlow, BatchNorm statistics updated in train mode, gradients, ``requires_grad``
flags and train/eval mode all stay on the copy), and what it keeps between calls on that copy
is an explicit state object (SynFlow's). With ``masks``, the copy's pruned weights are zeroed
first, so a criterion scores the pruned network (iterative pruning).

Available: ``random`` and ``magnitude`` (baselines), ``snip`` (Lee et al. 2019), ``grasp``
(Wang et al. 2020), ``synflow`` (Tanaka et al. 2020) at initialisation; ``obd`` (LeCun et al.
1990), ``woodfisher`` (OBS scores with a block-diagonal empirical Fisher inverse, Singh &
Alistarh 2020; :func:`winnow.schedules.obs_prune` also updates the remaining weights) and
``taylor`` (first-order Taylor importance of output units through gates, Molchanov et al.
2019) after training.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from winnow.criteria.basic import RandomOptions, magnitude, magnitude_scores, random
from winnow.criteria.fisher import (
    ObdOptions,
    WoodFisherOptions,
    WoodFisherState,
    obd,
    obs_update,
    woodfisher,
)
from winnow.criteria.grasp import GraspOptions, grasp, hessian_gradient_product
from winnow.criteria.registry import (
    REGISTRY,
    Criterion,
    Scoring,
    available,
    lookup,
    register,
    score_copy,
)
from winnow.criteria.sampling import DataSource
from winnow.criteria.snip import SnipOptions, snip
from winnow.criteria.synflow import SynFlowOptions, SynFlowState, synflow
from winnow.criteria.taylor import TaylorOptions, taylor


def score(
    model: nn.Module, method: str, data: DataSource | None = None, **options: Any
) -> dict[str, Tensor]:
    """Score every prunable weight of ``model`` with the criterion ``method``.

    Returns parameter name -> score tensor of the parameter's shape (higher = keep). ``data``
    is needed by the data-driven criteria (``snip``, ``grasp``, ...): a
    :class:`~winnow.data.DataSplits`, a pair of tensors ``(x, y)``, or an iterable of
    ``(x, y)`` batches. ``options`` are the criterion's own (its options class says which;
    an unknown one is a ``ValueError`` listing them), plus ``names`` (the parameters to score)
    and ``masks`` (score the network with these weights pruned). ``ValueError`` for an
    unknown method.
    """
    return score_copy(method, model, data, **options)


__all__ = [
    "REGISTRY",
    "Criterion",
    "DataSource",
    "GraspOptions",
    "ObdOptions",
    "RandomOptions",
    "Scoring",
    "SnipOptions",
    "SynFlowOptions",
    "SynFlowState",
    "TaylorOptions",
    "WoodFisherOptions",
    "WoodFisherState",
    "available",
    "grasp",
    "hessian_gradient_product",
    "lookup",
    "magnitude",
    "magnitude_scores",
    "obd",
    "obs_update",
    "random",
    "register",
    "score",
    "snip",
    "synflow",
    "taylor",
    "woodfisher",
]
