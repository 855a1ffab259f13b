"""Layer-wise one-shot pruning of transformers and other stacks of blocks (stage 6).

- :func:`oneshot` (``oneshot``): SparseGPT, Wanda or per-row magnitude, block by block with
  calibration data, to a density or an N:M pattern (SparseGPT's sequential mode).
- :func:`find_blocks`, :func:`block_layers` (``blocks``): the stack of blocks and their layers.
- :mod:`~winnow.layerwise.solvers`: the per-layer solvers on a weight matrix and its inputs'
  Gram matrix, and the reconstruction error.
"""

from winnow.layerwise.blocks import block_layers, find_blocks
from winnow.layerwise.oneshot import LayerReport, OneShotResult, oneshot
from winnow.layerwise.solvers import (
    SOLVERS,
    DampingWarning,
    magnitude_rows,
    reconstruction_error,
    sparsegpt,
    wanda,
    wanda_scores,
)

__all__ = [
    "SOLVERS",
    "DampingWarning",
    "LayerReport",
    "OneShotResult",
    "block_layers",
    "find_blocks",
    "magnitude_rows",
    "oneshot",
    "reconstruction_error",
    "sparsegpt",
    "wanda",
    "wanda_scores",
]
