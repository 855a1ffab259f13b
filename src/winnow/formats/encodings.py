"""Encodings of a sparse tensor (index + values), each with an exact size model.

Hoefler et al. 2021, §2.2: storing the ``m`` non-zeros of an ``n``-element tensor costs an index
whose size depends on the format and the density; no fixed format is best everywhere. Each
format here turns a tensor into named bit streams (the index) plus the raw bytes of its
non-zero values, and back, bitwise exactly. Sizes, per tensor of ``n`` elements with ``m``
non-zeros and a 2-D view of ``R`` rows and ``C`` columns (``w(x) = ceil(log2(x + 1))`` bits
write every integer up to ``x``; every stream is padded to a whole byte):

=================  ==============================================================  ===========
format             index bits                                                      values
=================  ==============================================================  ===========
``dense``          0                                                               ``n``
``bitmap``         ``n``                                                           ``m``
``coo``            ``m * w(n - 1)`` (absolute offsets, i.e. ``m * ceil(log2 n)``)  ``m``
``delta``          ``m * w(g_max)``: ``g_i`` zeros before each non-zero            ``m``
``padded-delta``   ``(m + p) * b``: a padding entry ``2**b - 1`` skips that many   ``m``
                   zeros, ``p = sum_i floor(g_i / (2**b - 1))``; best ``b`` unless
                   given
``csr``            ``m * w(C - 1) + (R + 1) * w(m)`` (row pointers up to ``m``)    ``m``
``csc``            ``m * w(R - 1) + (C + 1) * w(m)``, values in column order       ``m``
``entropy``        Golomb-coded gaps or enumerative blocks (:mod:`.entropy`),       ``m``
                   within ~1.5% of ``log2 C(n, m)``
=================  ==============================================================  ===========

The row pointers take ``w(m) = ceil(log2(m + 1))`` bits, not ``ceil(log2 m)``, because the last
pointer equals ``m``. ``g_max`` is the largest gap, so ``w(g_max) = ceil(log2 d_max)`` with
``d_max = g_max + 1`` the largest distance between consecutive positions (the first counted from
position -1). The 2-D view has ``R = shape[0]`` rows and ``C = n / R`` columns; a scalar or a
vector is one row.

Non-zero means a non-zero bit pattern, so ``-0.0`` is stored as a value and every tensor comes
back bit for bit. Values are the raw little-endian words of the dtype (bf16 as its 16 bits).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from winnow.formats import entropy
from winnow.formats.bits import bit_width, pack_uint, unpack_bits, unpack_uint
from winnow.formats.errors import SparseFileError

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
"""The dtypes a tensor may have, by the name files use."""

WORDS = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def dtype_name(dtype: torch.dtype) -> str:
    """The file name of a supported dtype; ``ValueError`` for the others."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not supported (supported: {', '.join(DTYPES)})")


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows and columns of the 2-D view of a tensor: ``(shape[0], rest)``; one row if ndim <= 1."""
    n = math.prod(shape)
    if len(shape) <= 1:
        return 1, n
    return shape[0], math.prod(shape[1:])


@dataclass(frozen=True)
class SparseView:
    """A tensor seen as raw words: its shape, dtype, bit patterns and non-zero positions."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    words: np.ndarray  # flat raw bit patterns (unsigned, little-endian), row-major
    positions: np.ndarray  # sorted flat indices (int64) of the non-zero bit patterns

    @classmethod
    def of(cls, tensor: Tensor) -> SparseView:
        """Analyse ``tensor`` (any device; copied to the CPU)."""
        if not isinstance(tensor, Tensor):
            raise TypeError(f"expected a tensor, got {type(tensor).__name__}")
        dtype_name(tensor.dtype)
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy()
        words = raw.view(WORDS[flat.element_size()])
        positions = np.flatnonzero(words)
        return cls(tuple(tensor.shape), tensor.dtype, words, positions.astype(np.int64))

    @property
    def n(self) -> int:
        return self.words.size

    @property
    def m(self) -> int:
        return self.positions.size

    @property
    def itemsize(self) -> int:
        return self.words.dtype.itemsize

    @property
    def matrix(self) -> tuple[int, int]:
        return matrix_shape(self.shape)


@dataclass
class Encoded:
    """One tensor in one format: index streams, value bytes and the parameters to read them."""

    format: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nnz: int
    params: dict[str, Any]
    streams: dict[str, np.ndarray]  # index streams, uint8
    values: np.ndarray = field(repr=False)  # raw little-endian value words as uint8

    @property
    def index_nbytes(self) -> int:
        return sum(s.size for s in self.streams.values())

    @property
    def nbytes(self) -> int:
        """Index plus uncompressed value bytes."""
        return self.index_nbytes + self.values.size


@dataclass(frozen=True)
class Format:
    """One index format: its exact size per stream, its encoder and its decoder.

    ``stream_bits(view, **options)`` gives the exact bits of each index stream (each stored in
    ``ceil(bits / 8)`` bytes); ``encode(view, **options)`` returns ``(params, streams,
    order)`` where ``order`` lists the positions in the order the values are stored;
    ``decode(streams, params, shape, m)`` returns those positions, checking what it reads.
    """

    name: str
    stream_bits: Callable[..., dict[str, int]]
    encode: Callable[..., tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]]
    decode: Callable[..., np.ndarray]
    stores_all_values: bool = False
    options: tuple[str, ...] = ()
    count_only: bool = False  # the size depends on the shape and the count only

    def index_nbytes(self, view: SparseView, **options: Any) -> int:
        """Exact bytes of the index streams."""
        return sum((b + 7) // 8 for b in self.stream_bits(view, **options).values())

    def nbytes(self, view: SparseView, **options: Any) -> int:
        """Exact bytes of index plus uncompressed values."""
        count = view.n if self.stores_all_values else view.m
        return self.index_nbytes(view, **options) + count * view.itemsize


def _expect(streams: dict[str, np.ndarray], names: tuple[str, ...], what: str) -> None:
    if set(streams) != set(names):
        raise SparseFileError(f"{what}: expected streams {list(names)}, found {sorted(streams)}")


def _check_sorted(positions: np.ndarray, n: int, what: str) -> np.ndarray:
    if positions.size and (
        int(positions[-1]) >= n or int(positions[0]) < 0 or (np.diff(positions) <= 0).any()
    ):
        raise SparseFileError(f"{what}: positions are out of range or not increasing")
    return positions


def _int_param(params: dict[str, Any], key: str, low: int, high: int, what: str) -> int:
    value = params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SparseFileError(f"{what}: parameter {key}={value!r} is outside [{low}, {high}]")
    return value


# -- dense -------------------------------------------------------------------------------------
def _dense_bits(view: SparseView) -> dict[str, int]:
    return {}


def _dense_encode(view: SparseView):
    return {}, {}, None  # every value, in order


def _dense_decode(streams, params, shape, m, what="dense"):
    _expect(streams, (), what)
    return None


# -- bitmap ------------------------------------------------------------------------------------
def _bitmap_bits(view: SparseView) -> dict[str, int]:
    return {"bitmap": view.n}


def _bitmap_encode(view: SparseView):
    mask = np.zeros(view.n, np.uint8)
    mask[view.positions] = 1
    return {}, {"bitmap": np.packbits(mask)}, view.positions


def _bitmap_decode(streams, params, shape, m, what="bitmap"):
    _expect(streams, ("bitmap",), what)
    n = math.prod(shape)
    positions = np.flatnonzero(unpack_bits(streams["bitmap"], n, what))
    if positions.size != m:
        raise SparseFileError(f"{what}: holds {positions.size} non-zeros, expected {m}")
    return positions


# -- coo ---------------------------------------------------------------------------------------
def _coo_bits(view: SparseView) -> dict[str, int]:
    return {"index": view.m * bit_width(max(view.n - 1, 0))}


def _coo_encode(view: SparseView):
    width = bit_width(max(view.n - 1, 0))
    return {}, {"index": pack_uint(view.positions, width)}, view.positions


def _coo_decode(streams, params, shape, m, what="coo"):
    _expect(streams, ("index",), what)
    n = math.prod(shape)
    positions = unpack_uint(streams["index"], bit_width(max(n - 1, 0)), m, what).astype(np.int64)
    return _check_sorted(positions, n, what)


# -- delta -------------------------------------------------------------------------------------
def _gaps(positions: np.ndarray) -> np.ndarray:
    """Zeros before each non-zero: ``positions[i] - positions[i - 1] - 1`` (from -1)."""
    return (np.diff(positions, prepend=-1) - 1).astype(np.int64)


def _delta_width(view: SparseView) -> int:
    return bit_width(int(_gaps(view.positions).max())) if view.m else 0


def _delta_bits(view: SparseView) -> dict[str, int]:
    return {"runs": view.m * _delta_width(view)}


def _delta_encode(view: SparseView):
    width = _delta_width(view)
    return {"width": width}, {"runs": pack_uint(_gaps(view.positions), width)}, view.positions


def _from_gaps(gaps: np.ndarray, n: int, what: str) -> np.ndarray:
    if gaps.size and int(gaps.max()) >= n:
        raise SparseFileError(f"{what}: positions run past the end of the tensor")
    positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
    return _check_sorted(positions, n, what)


def _delta_decode(streams, params, shape, m, what="delta"):
    _expect(streams, ("runs",), what)
    width = _int_param(params, "width", 0, 64, what)
    return _from_gaps(unpack_uint(streams["runs"], width, m, what), math.prod(shape), what)


# -- zero-padded delta -------------------------------------------------------------------------
def _padding(gaps: np.ndarray, width: int) -> int:
    return int((gaps // ((1 << width) - 1)).sum())


def _padded_width(view: SparseView, width: int | None) -> int:
    if width is not None:
        if not isinstance(width, int) or not 1 <= width <= 62:
            raise ValueError(f"padded-delta width must be an int in [1, 62], got {width!r}")
        return width
    if view.m == 0:
        return 1
    gaps = _gaps(view.positions)
    top = bit_width(int(gaps.max())) + 1
    sizes = {b: (view.m + _padding(gaps, b)) * b for b in range(1, top + 1)}
    return min(sizes, key=lambda b: (sizes[b], b))


def _padded_bits(view: SparseView, width: int | None = None) -> dict[str, int]:
    b = _padded_width(view, width)
    return {"entries": (view.m + _padding(_gaps(view.positions), b)) * b}


def _padded_encode(view: SparseView, width: int | None = None):
    b = _padded_width(view, width)
    escape = (1 << b) - 1
    gaps = _gaps(view.positions)
    pads = gaps // escape
    entries = np.full(view.m + int(pads.sum()), escape, np.int64)
    entries[np.cumsum(pads + 1) - 1] = gaps % escape
    params = {"width": b, "entries": int(entries.size)}
    return params, {"entries": pack_uint(entries, b)}, view.positions


def _padded_decode(streams, params, shape, m, what="padded-delta"):
    _expect(streams, ("entries",), what)
    n = math.prod(shape)
    b = _int_param(params, "width", 1, 62, what)
    count = _int_param(params, "entries", m, m + n, what)
    entries = unpack_uint(streams["entries"], b, count, what).astype(np.int64)
    escape = (1 << b) - 1
    is_value = entries != escape
    if int(is_value.sum()) != m or (count and not is_value[-1]):
        raise SparseFileError(f"{what}: the entries do not describe {m} non-zeros")
    steps = np.where(is_value, entries + 1, escape)
    if count and int(steps.max()) > n:
        raise SparseFileError(f"{what}: positions run past the end of the tensor")
    positions = (np.cumsum(steps) - 1)[is_value]
    return _check_sorted(positions, n, what)


# -- csr / csc ---------------------------------------------------------------------------------
def _compressed_bits(view: SparseView, transpose: bool) -> dict[str, int]:
    rows, cols = view.matrix
    outer, inner = (cols, rows) if transpose else (rows, cols)
    return {
        "indices": view.m * bit_width(max(inner - 1, 0)),
        "indptr": (outer + 1) * bit_width(view.m),
    }


def _compressed_encode(view: SparseView, transpose: bool):
    rows, cols = view.matrix
    r, c = np.divmod(view.positions, max(cols, 1))
    order = view.positions
    if transpose:
        rows, cols, r, c = cols, rows, c, r
        sort = np.argsort(r * max(cols, 1) + c, kind="stable")
        order, r, c = order[sort], r[sort], c[sort]
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=rows), out=indptr[1:])
    streams = {
        "indices": pack_uint(c, bit_width(max(cols - 1, 0))),
        "indptr": pack_uint(indptr, bit_width(view.m)),
    }
    return {}, streams, order


def _compressed_decode(streams, params, shape, m, transpose: bool, what: str):
    _expect(streams, ("indices", "indptr"), what)
    rows, cols = matrix_shape(shape)
    if transpose:
        rows, cols = cols, rows
    if m == 0:  # nothing to place; both streams must be empty
        unpack_uint(streams["indices"], 0, 0, what)
        unpack_uint(streams["indptr"], 0, 0, what)
        return np.zeros(0, np.int64)
    indptr = unpack_uint(streams["indptr"], bit_width(m), rows + 1, f"{what} indptr")
    indptr = indptr.astype(np.int64)
    if indptr[0] != 0 or indptr[-1] != m or (np.diff(indptr) < 0).any():
        raise SparseFileError(f"{what}: the pointers are not a valid partition of {m} non-zeros")
    inner = unpack_uint(streams["indices"], bit_width(max(cols - 1, 0)), m, f"{what} indices")
    outer = np.repeat(np.arange(rows, dtype=np.int64), np.diff(indptr))
    key = _check_sorted(outer * cols + inner.astype(np.int64), rows * cols, what)
    if transpose:  # key is column-major; the positions are row-major
        return (key % cols) * rows + key // cols
    return key


def _csr_decode(streams, params, shape, m):
    return _compressed_decode(streams, params, shape, m, False, "csr")


def _csc_decode(streams, params, shape, m):
    return _compressed_decode(streams, params, shape, m, True, "csc")


# -- entropy -----------------------------------------------------------------------------------
def _entropy_bits(view: SparseView) -> dict[str, int]:
    return entropy.plan(view.positions, view.n)[1]


def _entropy_encode(view: SparseView):
    params, _ = entropy.plan(view.positions, view.n)
    return params, entropy.encode(view.positions, view.n, params), view.positions


def _entropy_decode(streams, params, shape, m, what="entropy"):
    method = params.get("method")
    if not isinstance(method, str) or method not in entropy.STREAMS:
        raise SparseFileError(f"{what}: unknown entropy method {method!r}")
    _expect(streams, entropy.STREAMS[method], what)
    n = math.prod(shape)
    return _check_sorted(entropy.decode(streams, n, m, params, what), n, what)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "dense",
            _dense_bits,
            _dense_encode,
            _dense_decode,
            stores_all_values=True,
            count_only=True,
        ),
        Format("bitmap", _bitmap_bits, _bitmap_encode, _bitmap_decode, count_only=True),
        Format("coo", _coo_bits, _coo_encode, _coo_decode, count_only=True),
        Format("delta", _delta_bits, _delta_encode, _delta_decode),
        Format("padded-delta", _padded_bits, _padded_encode, _padded_decode, options=("width",)),
        Format(
            "csr",
            lambda v: _compressed_bits(v, False),
            lambda v: _compressed_encode(v, False),
            _csr_decode,
            count_only=True,
        ),
        Format(
            "csc",
            lambda v: _compressed_bits(v, True),
            lambda v: _compressed_encode(v, True),
            _csc_decode,
            count_only=True,
        ),
        Format("entropy", _entropy_bits, _entropy_encode, _entropy_decode),
    )
}
"""Every format by name."""


def get_format(name: str) -> Format:
    """The format called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def value_bits(dtype: torch.dtype) -> int:
    """Bits of one value of ``dtype``."""
    return 8 * torch.empty((), dtype=dtype).element_size()


def bound_bits(n: int, m: int, dtype: torch.dtype | None = None) -> float:
    """The storage lower bound ``log2 C(n, m)`` (+ ``m`` values of ``dtype`` if given), in bits."""
    return entropy.log2_binomial(n, m) + (m * value_bits(dtype) if dtype is not None else 0)


__all__ = [
    "DTYPES",
    "FORMATS",
    "Encoded",
    "Format",
    "SparseView",
    "bound_bits",
    "dtype_name",
    "get_format",
    "matrix_shape",
    "value_bits",
]
