"""Storage layouts: where an entry of a dense tensor lies in memory, and back (private).

Selection keeps the alive weights as positions in the storage of the scores (channels-last
for SynFlow's convolutions) so every pass reads forwards; ties are still broken by the flat
index in the default row-major order. These functions convert between the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from winnow.core import _kernels


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(tuple(shape)):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def dense_layout(tensor: Tensor) -> bool:
    """Whether ``tensor`` fills its storage without gaps: the default layout or a permutation
    of its dimensions (channels-last)."""
    if tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last):
        return True
    dims = sorted((d for d in range(tensor.dim()) if tensor.shape[d] > 1), key=tensor.stride)
    step = 1
    for d in dims:
        if tensor.stride(d) != step:
            return False
        step *= tensor.shape[d]
    return True


def storage_offsets(flat: np.ndarray, shape: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """Where the entries at ``flat`` (indices in the default row-major order) lie in the
    storage of a dense tensor of ``shape`` and ``stride`` (e.g. channels-last)."""
    numel = math.prod(shape)
    dtype = flat.dtype if flat.dtype == np.int32 else np.int64
    if flat.size * 8 > numel:  # many: read them off the map of every position
        every = torch.arange(numel, dtype=torch.int32 if dtype == np.int32 else torch.int64)
        table = every.as_strided(tuple(shape), tuple(stride)).reshape(-1).numpy()
        return np.take(table, flat)
    offsets = np.zeros(flat.shape, dtype=np.int64)
    for coord, step in zip(np.unravel_index(flat, tuple(shape)), stride, strict=True):
        offsets += coord.astype(np.int64) * step
    return offsets.astype(dtype)


def flat_indices(positions: np.ndarray, shape: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """The inverse of :func:`storage_offsets`: the flat indices (default row-major order) of
    the entries at ``positions`` in the storage of a dense tensor of ``shape`` and ``stride``."""
    shape, stride = tuple(shape), tuple(stride)
    steps = contiguous_stride(shape)
    if stride == steps:
        return positions
    dims = sorted((d for d in range(len(shape)) if shape[d] > 1), key=lambda d: -stride[d])
    out = np.empty(positions.shape, dtype=positions.dtype)
    _kernels.flat_indices(
        positions,
        np.array([stride[d] for d in dims], dtype=np.int64),
        np.array([steps[d] for d in dims], dtype=np.int64),
        out,
    )
    return out


def index_dtype(size: int) -> type:
    """int32 positions where they fit: half the memory traffic of int64."""
    return np.int32 if size < 2**31 else np.int64
