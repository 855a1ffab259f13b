"""The core of the pipeline (stage 1): masks, scores, selection and enforcement.

- :class:`Masks` (``masks``): which weights are kept, by parameter name, as plain data;
  :func:`prunable_parameters` says which weights a mask covers.
- Scores (``scores``): parameter name -> tensor, higher = kept; :class:`AbsProductScores`.
- :func:`select` (``selection``): scores -> masks, globally, per layer or with a density per
  layer, among the weights still alive; :func:`select_groups` (``groups``) for whole filters,
  neurons, channels or blocks; density checks and the exponential schedule (``densities``).
- :func:`enforce` (``enforcement``): pruned weights stay exactly zero while a model trains.

The top-k engine (``_topk``), its threads (``_parallel``), storage-layout maths (``_layout``)
and compiled loops (``_compiled``, numba, loaded on first use) are private.
"""

from winnow.core.densities import SCOPES, check_density, check_sparsity, exponential_densities
from winnow.core.enforcement import MaskEnforcer, enforce
from winnow.core.groups import GROUPS, group_view, select_groups
from winnow.core.masks import MaskFileError, Masks, prunable_parameters
from winnow.core.scores import AbsProductScores
from winnow.core.selection import select

__all__ = [
    "GROUPS",
    "SCOPES",
    "AbsProductScores",
    "MaskEnforcer",
    "MaskFileError",
    "Masks",
    "check_density",
    "check_sparsity",
    "enforce",
    "exponential_densities",
    "group_view",
    "prunable_parameters",
    "select",
    "select_groups",
]
