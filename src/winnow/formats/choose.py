"""Pick the smallest encoding of a tensor by the exact size model."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from winnow.formats.encodings import FORMATS, SparseView, dtype_name, get_format, matrix_shape


@dataclass(frozen=True)
class Counts:
    """What the count-only formats need: shape, number of non-zeros, dtype."""

    shape: tuple[int, ...]
    m: int
    dtype: torch.dtype

    @property
    def n(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def matrix(self) -> tuple[int, int]:
        return matrix_shape(self.shape)


def _target(tensor) -> SparseView | Counts:
    if isinstance(tensor, SparseView | Counts):
        return tensor
    if isinstance(tensor, Tensor):
        return SparseView.of(tensor)
    try:
        shape, m, dtype = tensor
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise TypeError("expected a tensor or a (shape, nnz, dtype) triple") from None
    dtype_name(dtype)
    if not 0 <= int(m) <= math.prod(shape):
        raise ValueError(f"{m} non-zeros do not fit in shape {shape}")
    return Counts(shape, int(m), dtype)


def format_sizes(
    tensor: Tensor | SparseView | tuple, formats: Iterable[str] | None = None
) -> dict[str, int]:
    """Exact bytes (index streams + uncompressed values) of ``tensor`` in each format.

    ``tensor`` is a tensor, or a ``(shape, nnz, dtype)`` triple: then only the formats whose
    size is a function of those (``dense``, ``bitmap``, ``coo``, ``csr``, ``csc``) are sized,
    since the others depend on where the non-zeros are. Nothing is encoded.
    """
    target = _target(tensor)
    names = list(FORMATS) if formats is None else list(formats)
    sizes = {}
    for name in names:
        fmt = get_format(name)
        if isinstance(target, Counts) and not fmt.count_only:
            if formats is not None:
                raise ValueError(f"the size of {name!r} depends on the positions: pass a tensor")
            continue
        sizes[name] = fmt.nbytes(target)
    return sizes


def choose_format(tensor: Tensor | SparseView | tuple, formats: Iterable[str] | None = None) -> str:
    """The format with the fewest bytes for ``tensor`` (exact sizes; ties go to the simpler).

    ``formats`` restricts the candidates (default: all of :data:`winnow.formats.FORMATS`). With
    a ``(shape, nnz, dtype)`` triple only the count-only formats compete (see
    :func:`format_sizes`).
    """
    sizes = format_sizes(tensor, formats)
    if not sizes:
        raise ValueError("no candidate format")
    order = list(FORMATS)
    return min(sizes, key=lambda name: (sizes[name], order.index(name)))


def index_bits_per_nonzero(tensor: Tensor | SparseView) -> dict[str, float]:
    """Index bits per non-zero of every sparse format (stream bits, before byte padding).

    The quantity of the storage figure of Hoefler et al. 2021, §2.2; ``inf`` without non-zeros.
    """
    view = tensor if isinstance(tensor, SparseView) else SparseView.of(tensor)
    out = {}
    for name, fmt in FORMATS.items():
        if fmt.stores_all_values:
            continue
        bits = sum(fmt.stream_bits(view).values())
        out[name] = bits / view.m if view.m else float(np.inf)
    return out
