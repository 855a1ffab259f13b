"""Sparse inference: pruned layers executed by the fastest kernel measured on this machine
(stage 7). :func:`accelerate` chooses per layer among dense, torch's CSR and BSR and winnow's
compiled kernels (:mod:`winnow.inference.kernels`); :func:`save_accelerated` and
:func:`load_accelerated` keep the choices with the weights."""

from winnow.inference.accelerate import (
    LayerChoice,
    accelerate,
    choices,
    load_accelerated,
    save_accelerated,
    table,
)
from winnow.inference.layers import SparseConv1x1, SparseLinear

__all__ = [
    "LayerChoice",
    "SparseConv1x1",
    "SparseLinear",
    "accelerate",
    "choices",
    "load_accelerated",
    "save_accelerated",
    "table",
]
