"""Encode a tensor in a storage format and decode it back, bitwise exactly.

The formats themselves (their streams and exact sizes) are defined in
:mod:`winnow.formats.encodings`; ``format="auto"`` takes the smallest by the size model
(:func:`winnow.formats.choose.choose_format`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from winnow.formats.choose import choose_format
from winnow.formats.encodings import FORMATS, WORDS, Encoded, SparseView, get_format
from winnow.formats.errors import SparseFileError


def _view(tensor: Tensor | SparseView) -> SparseView:
    return tensor if isinstance(tensor, SparseView) else SparseView.of(tensor)


def encode(tensor: Tensor | SparseView, format: str, **options: Any) -> Encoded:
    """Encode ``tensor`` in ``format`` (a name of :data:`FORMATS`; ``"auto"`` picks the smallest).

    Options: ``width`` for ``padded-delta`` (default: the width with the smallest index).
    """
    view = _view(tensor)
    if format == "auto":
        format = choose_format(view)
    fmt = get_format(format)
    unknown = set(options) - set(fmt.options)
    if unknown:
        raise ValueError(f"format {format!r} takes no option {sorted(unknown)}")
    params, streams, order = fmt.encode(view, **options)
    values = (view.words if order is None else view.words[order]).view(np.uint8)
    return Encoded(format, view.shape, view.dtype, view.m, params, streams, values)


def decode_positions(
    format: str, streams: dict[str, np.ndarray], params: dict[str, Any], shape, m: int
) -> np.ndarray | None:
    """Positions (row-major flat indices, in value order) of an encoded index; checks it.

    ``None`` for ``dense``: every position, in order.
    """
    if not isinstance(format, str) or format not in FORMATS:
        raise SparseFileError(f"unknown format {format!r} (known: {', '.join(FORMATS)})")
    if not isinstance(params, dict):
        raise SparseFileError(f"{format}: parameters must be a mapping")
    if not 0 <= m <= math.prod(shape):
        raise SparseFileError(f"{format}: {m} non-zeros do not fit in shape {tuple(shape)}")
    positions = FORMATS[format].decode(streams, params, tuple(shape), m)
    if positions is not None and positions.size != m:
        raise SparseFileError(f"{format}: the index holds {positions.size} positions")
    return positions


def assemble(
    positions: np.ndarray | None, values: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    """The tensor with ``values`` (raw little-endian words as uint8) at ``positions``.

    ``positions=None``: ``values`` holds every element, in order.
    """
    word = WORDS[torch.empty((), dtype=dtype).element_size()]
    if positions is None:
        words = values.view(word).copy()
    else:
        words = np.zeros(math.prod(shape), word)
        words[positions] = values.view(word)
    return torch.from_numpy(words.view(np.uint8)).view(dtype).reshape(shape)


def decode(encoded: Encoded) -> Tensor:
    """The tensor an :class:`Encoded` holds (bitwise identical to the encoded one)."""
    positions = decode_positions(
        encoded.format, encoded.streams, encoded.params, encoded.shape, encoded.nnz
    )
    return assemble(positions, encoded.values, encoded.shape, encoded.dtype)
