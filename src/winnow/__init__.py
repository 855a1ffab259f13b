"""winnow: pruning neural networks in PyTorch.

The public API is small; each piece lives in a module of its own, loaded on first use (so
``import winnow`` costs almost nothing beyond ``import torch``):

- :class:`Masks` (``winnow.core.masks``): which weights are kept, as plain, saveable data.
- :func:`enforce` (``winnow.core.enforcement``): keep pruned weights at exactly zero while
  training.
- :func:`train`, :func:`evaluate`, :class:`TrainConfig` (``winnow.training``).
- ``winnow.models.create(name, ...)``: the papers' architectures.
- ``winnow.data.load(name, ...)``: offline datasets held as tensors.
- :func:`score` (``winnow.criteria``): random, magnitude, SNIP, GraSP, SynFlow, OBD,
  WoodFisher and Taylor scores.
- :func:`select` (``winnow.core.selection``): scores -> masks, globally or per layer.
- :class:`Pruner` (``winnow.schedules``): a criterion, a density schedule and a scope; every
  pruning method is one. :func:`prune_at_init` and :func:`prune_after_training` score and
  select before or after training, one-shot or iteratively. :class:`DynamicSparsity`: sparse
  training from scratch with drop and grow (SET, RigL) over uniform, ER or ERK densities.
- :func:`save_sparse`, :func:`load_sparse` (``winnow.formats``): a pruned model in one compact,
  checksummed file (Hoefler et al. 2021, §2.2), and back, bitwise exactly.
- :func:`oneshot` (``winnow.layerwise``): SparseGPT, Wanda and per-row magnitude, layer by
  layer with calibration data, to a density or an N:M pattern.
- :func:`accelerate` (``winnow.inference``): each pruned layer executed by the fastest of
  dense, torch's CSR/BSR and winnow's compiled sparse kernels, timed on this machine.
- :func:`prune_from_scratch`, :func:`shrink` (``winnow.structured``): channel structures at a
  FLOPs budget (Pruning from Scratch and its baselines), and the smaller dense network.

The layout follows the pipeline (``docs/architecture.md``): io -> core -> data, models ->
training -> criteria -> schedules -> structured and the other methods -> formats ->
experiments -> cli; no module imports a later stage.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from winnow._version import __version__

_EXPORTS = {
    "Masks": "winnow.core.masks",
    "prunable_parameters": "winnow.core.prunable",
    "MaskEnforcer": "winnow.core.enforcement",
    "enforce": "winnow.core.enforcement",
    "select": "winnow.core.selection",
    "score": "winnow.criteria",
    "Pruner": "winnow.schedules",
    "DynamicSparsity": "winnow.schedules",
    "prune_at_init": "winnow.schedules",
    "prune_after_training": "winnow.schedules",
    "TrainConfig": "winnow.training",
    "TrainResult": "winnow.training",
    "evaluate": "winnow.training",
    "train": "winnow.training",
    "save_sparse": "winnow.formats",
    "load_sparse": "winnow.formats",
    "oneshot": "winnow.layerwise",
    "accelerate": "winnow.inference",
    "prune_from_scratch": "winnow.structured",
    "shrink": "winnow.structured",
}
"""Public names, and the module each comes from (imported on first access)."""

_MODULES = (
    "analysis", "core", "criteria", "data", "experiments", "formats", "inference", "io",
    "layerwise", "models", "neurons", "regularizers", "schedules", "structured", "training",
    "variational",
)  # fmt: skip
"""Subpackages reachable as attributes (``winnow.data.load``) without importing them first."""

if TYPE_CHECKING:  # what static tools see; at run time each comes on first access
    from winnow import analysis, data, models, structured
    from winnow.core.enforcement import MaskEnforcer, enforce
    from winnow.core.masks import Masks
    from winnow.core.prunable import prunable_parameters
    from winnow.core.selection import select
    from winnow.criteria import score
    from winnow.formats import load_sparse, save_sparse
    from winnow.inference import accelerate
    from winnow.layerwise import oneshot
    from winnow.schedules import DynamicSparsity, Pruner, prune_after_training, prune_at_init
    from winnow.structured import prune_from_scratch, shrink
    from winnow.training import TrainConfig, TrainResult, evaluate, train


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _MODULES:
        return importlib.import_module(f"winnow.{name}")
    raise AttributeError(f"module 'winnow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_MODULES})


__all__ = [
    "DynamicSparsity",
    "accelerate",
    "Masks",
    "MaskEnforcer",
    "Pruner",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "analysis",
    "data",
    "enforce",
    "evaluate",
    "load_sparse",
    "models",
    "oneshot",
    "prunable_parameters",
    "prune_after_training",
    "prune_at_init",
    "prune_from_scratch",
    "save_sparse",
    "score",
    "select",
    "shrink",
    "structured",
    "train",
]
