"""winnow: pruning neural networks in PyTorch.

The public API is small; each piece lives in a module of its own:

- :class:`Masks` (``winnow.masks``): which weights are kept, as plain, saveable data.
- :func:`enforce` (``winnow.enforcement``): keep pruned weights at exactly zero while training.
- :func:`train`, :func:`evaluate`, :class:`TrainConfig` (``winnow.training``).
- ``winnow.models.create(name, ...)``: the papers' architectures.
- ``winnow.data.load(name, ...)``: offline datasets held as tensors.
"""

from winnow import data, models
from winnow.enforcement import MaskEnforcer, enforce
from winnow.masks import Masks, prunable_parameters
from winnow.training import TrainConfig, TrainResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "Masks",
    "MaskEnforcer",
    "TrainConfig",
    "TrainResult",
    "data",
    "enforce",
    "evaluate",
    "models",
    "prunable_parameters",
    "train",
]
