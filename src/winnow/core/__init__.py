"""The core of the pipeline (stage 1): masks, scores, selection and enforcement.

- :class:`Masks` (``masks``): which weights are kept, by parameter name, as plain data;
  :func:`prunable_parameters` (``prunable``) says which weights a mask covers, by
  :class:`Rules`, and unwraps compiled and distributed models.
- Scores (``scores``): parameter name -> tensor, higher = kept; :class:`AbsProductScores`.
- :func:`select` (``selection``): scores -> masks, globally, per layer or with a density per
  layer, among the weights still alive; :func:`select_groups` (``groups``) for whole filters,
  neurons, channels or blocks; density checks and the exponential schedule (``densities``).
- :func:`enforce` (``enforcement``): pruned weights stay exactly zero while a model trains.
- ``interop``: masks to and from ``torch.nn.utils.prune`` and ``torch.ao.pruning``, and the
  plain state_dict of a wrapped or reparametrised model.

The top-k engine (``_topk``), its threads (``_parallel``), storage-layout maths (``_layout``)
and compiled loops (``_compiled``, numba, loaded on first use) are private.
"""

from winnow.core.densities import SCOPES, check_density, check_sparsity, exponential_densities
from winnow.core.enforcement import MaskEnforcer, enforce
from winnow.core.groups import GROUPS, group_view, select_groups
from winnow.core.interop import from_ao, from_torch_prune, plain_state_dict, to_ao, to_torch_prune
from winnow.core.masks import MaskFileError, Masks
from winnow.core.prunable import (
    DEFAULT_RULES,
    PrunableReport,
    Rules,
    UncoveredWeightsWarning,
    prunable_parameters,
    unwrap,
)
from winnow.core.scores import AbsProductScores
from winnow.core.selection import select

__all__ = [
    "DEFAULT_RULES",
    "GROUPS",
    "SCOPES",
    "AbsProductScores",
    "MaskEnforcer",
    "MaskFileError",
    "Masks",
    "PrunableReport",
    "Rules",
    "UncoveredWeightsWarning",
    "check_density",
    "check_sparsity",
    "enforce",
    "exponential_densities",
    "from_ao",
    "from_torch_prune",
    "group_view",
    "plain_state_dict",
    "prunable_parameters",
    "select",
    "select_groups",
    "to_ao",
    "to_torch_prune",
    "unwrap",
]
