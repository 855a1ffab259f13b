"""winnow: pruning neural networks in PyTorch.

The public API is small; each piece lives in a module of its own:

- :class:`Masks` (``winnow.masks``): which weights are kept, as plain, saveable data.
- :func:`enforce` (``winnow.enforcement``): keep pruned weights at exactly zero while training.
- :func:`train`, :func:`evaluate`, :class:`TrainConfig` (``winnow.training``).
- ``winnow.models.create(name, ...)``: the papers' architectures.
- ``winnow.data.load(name, ...)``: offline datasets held as tensors.
- :func:`score` (``winnow.criteria``): random, magnitude, SNIP, GraSP, SynFlow scores.
- :func:`select` (``winnow.selection``): scores -> masks, globally or per layer.
- :func:`prune_at_init` (``winnow.schedules``): score and select before training, one-shot or
  iteratively.
- :func:`save_sparse`, :func:`load_sparse` (``winnow.formats``): a pruned model in one compact,
  checksummed file (Hoefler et al. 2021, §2.2), and back, bitwise exactly.
- :func:`prune_from_scratch`, :func:`shrink` (``winnow.structured``): channel structures at a
  FLOPs budget (Pruning from Scratch and its baselines), and the smaller dense network.
"""

from winnow import analysis, data, models, structured
from winnow.core.enforcement import MaskEnforcer, enforce
from winnow.core.masks import Masks, prunable_parameters
from winnow.core.selection import select
from winnow.criteria import score
from winnow.formats import load_sparse, save_sparse
from winnow.schedules import prune_at_init
from winnow.structured import prune_from_scratch, shrink
from winnow.training import TrainConfig, TrainResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "Masks",
    "MaskEnforcer",
    "TrainConfig",
    "TrainResult",
    "analysis",
    "data",
    "enforce",
    "evaluate",
    "load_sparse",
    "models",
    "prunable_parameters",
    "prune_at_init",
    "prune_from_scratch",
    "save_sparse",
    "score",
    "select",
    "shrink",
    "structured",
    "train",
]
