"""Where a criterion's private copy lives and how its normalisation layers behave.

The data a criterion reads is taken by :func:`winnow.inputs.sample` (any form
:mod:`winnow.inputs` accepts: DataSplits, ``(x, y)``, DataLoaders, lists of tuple or dict
batches).
"""

from __future__ import annotations

import torch

from winnow.inputs import DataSource

__all__ = ["BN_MODES", "DataSource", "model_device", "set_bn_mode"]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


BN_MODES = ("train", "eval")


def set_bn_mode(model: torch.nn.Module, bn_mode: str) -> None:
    """Put ``model`` in train mode (BatchNorm uses batch statistics) or eval mode (running
    statistics) for scoring; ``ValueError`` for any other value."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}; choose one of {BN_MODES}")
    model.train(bn_mode == "train")
