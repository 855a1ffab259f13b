"""Criteria: how important is each prunable weight? Higher score = more important = kept.

Every criterion is a function ``criterion(model, data=None, *, names=None, masks=None,
**options) -> {parameter name: score tensor}`` registered under a name, so configurations and
the command line say ``"snip"`` and get the function. :func:`score` dispatches by name.

No criterion changes the model it is given: each works on a private copy (weights made
absolute for SynFlow, BatchNorm statistics updated in train mode, gradients, ``requires_grad``
flags and train/eval mode all stay on the copy). With ``masks``, the copy's pruned weights are
zeroed first, so a criterion scores the pruned network (iterative pruning).

Available: ``random`` and ``magnitude`` (baselines), ``snip`` (Lee et al. 2019), ``grasp``
(Wang et al. 2020), ``synflow`` (Tanaka et al. 2020) at initialisation; ``obd`` (LeCun et al.
1990) and ``woodfisher`` (OBS scores with a block-diagonal empirical Fisher inverse, Singh &
Alistarh 2020; :func:`obs_prune` also updates the remaining weights) and ``taylor`` (first-order
Taylor importance of output units through gates, Molchanov et al. 2019) after training.
"""

from __future__ import annotations

from torch import Tensor, nn

from winnow.criteria._registry import REGISTRY, available, lookup, register
from winnow.criteria.basic import magnitude, random
from winnow.criteria.data import DataSource, sample_batches
from winnow.criteria.fisher import obd, obs_prune, obs_update, woodfisher
from winnow.criteria.grasp import grasp, hessian_gradient_product
from winnow.criteria.snip import snip
from winnow.criteria.synflow import synflow
from winnow.criteria.taylor import taylor


def score(
    model: nn.Module, method: str, data: DataSource | None = None, **options
) -> dict[str, Tensor]:
    """Score every prunable weight of ``model`` with the criterion ``method``.

    Returns parameter name -> score tensor of the parameter's shape (higher = keep). ``data``
    is needed by the data-driven criteria (``snip``, ``grasp``): a :class:`~winnow.data.
    DataSplits`, a pair of tensors ``(x, y)``, or an iterable of ``(x, y)`` batches. Options
    are the criterion's own (see each function), plus ``names`` (the parameters to score) and
    ``masks`` (score the network with these weights pruned). ``ValueError`` for an unknown
    method.
    """
    return lookup(method).function(model, data, **options)


__all__ = [
    "REGISTRY",
    "DataSource",
    "available",
    "grasp",
    "hessian_gradient_product",
    "lookup",
    "magnitude",
    "obd",
    "obs_prune",
    "obs_update",
    "random",
    "register",
    "sample_batches",
    "score",
    "snip",
    "synflow",
    "taylor",
    "woodfisher",
]
