"""winnow's own sparse matrix products: y = x · Wᵀ (+ b) for a pruned W, compiled with numba.

The survey's storage formats (Hoefler et al. 2021, §2.2), used for compute. A layer's product
at batch 1 is bound by memory traffic (every stored byte is read once), so the formats keep
as few bytes per kept weight as the gather allows:

- ``csr``: compressed sparse rows: ``ptr`` (out + 1 offsets), column indices as uint16 (int32
  for more than 65,536 inputs), float32 values: 6 bytes a kept weight.
- ``chunk``: rows cut into chunks of 256 columns; within a chunk a kept weight's column is one
  byte (its offset from the chunk's start), with one offset into the values per (row, chunk):
  5 bytes a kept weight plus 4 per 256 columns of every row. Pays at middle densities (10-60%),
  where the chunk pointers are a small share.
- ``nm``: an N:M pattern (``2:4``, ``4:8``): exactly N values of every group of M inputs, and
  their columns as one-byte offsets within their chunk of 256, with no pointers at all (a
  row's chunk holds exactly 256·N/M values): 5 bytes a kept weight, 2.5 a weight at 2:4.

Every kernel runs its rows in parallel (numba's ``prange``; the ``serial`` variants run them in
the calling thread, which wins on small layers where starting threads costs more than the
product), accumulates in float32 with reassociation allowed (``fastmath``: the order of the
additions differs from a dense product, within float32 rounding), takes the input as ``x``
(batch 1: a vector) and writes the outputs into ``y``. Larger batches go through
:mod:`winnow.inference.tiled`, on the same packed arrays.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
from numba import prange

CHUNK = 256
"""Columns per chunk of the ``chunk`` and ``nm`` formats (so an offset fits in one byte)."""

_OPTIONS = dict(nogil=True, fastmath=True, boundscheck=False)


def _compile(function):
    """(serial, parallel) compiled versions of a kernel. The parallel one is compiled from a
    copy with its own qualified name: numba's on-disk cache keys on the name, and would hand
    the serial machine code to the parallel dispatcher."""
    twin = types.FunctionType(function.__code__, function.__globals__, function.__name__)
    twin.__qualname__ = function.__qualname__ + "_parallel"
    serial = numba.njit(cache=True, **_OPTIONS)(function)
    return serial, numba.njit(parallel=True, cache=True, **_OPTIONS)(twin)


# The inner loops run over slices from 0 to their size: with a row's bounds from ``ptr`` as
# the loop's range instead, LLVM did not vectorise the gather (measured 5x slower).
@numba.njit(inline="always", **_OPTIONS)
def _dot(vals, index, x):
    """Σ_k vals[k] · x[index[k]]."""
    acc = np.float32(0.0)
    for k in range(vals.size):
        acc += vals[k] * x[index[k]]
    return acc


# -- csr ------------------------------------------------------------------------------------
def _csr_vector(ptr, cols, vals, x, bias, y):
    v = x[0]
    for r in prange(y.shape[1]):
        s, e = ptr[r], ptr[r + 1]
        y[0, r] = _dot(vals[s:e], cols[s:e], v) + bias[r]


# -- chunk ----------------------------------------------------------------------------------
def _chunk_vector(ptr, offsets, vals, chunks, x, bias, y):
    v = x[0]
    for r in prange(y.shape[1]):
        acc = np.float32(0.0)
        first = r * chunks
        for c in range(chunks):
            s, e = ptr[first + c], ptr[first + c + 1]
            acc += _dot(vals[s:e], offsets[s:e], v[c * 256 : (c + 1) * 256])
        y[0, r] = acc + bias[r]


# -- n:m ------------------------------------------------------------------------------------
# A row keeps exactly ``per_chunk`` = 256·n/m values per chunk of 256 inputs (the last chunk
# in proportion), so no pointers are stored: chunk c's values are [c·per_chunk, ...).
def _nm_vector(offsets, vals, per_chunk, x, bias, y):
    v = x[0]
    kept = vals.shape[1]
    for r in prange(y.shape[1]):
        acc = np.float32(0.0)
        row_vals, row_offsets = vals[r], offsets[r]
        for c in range((kept + per_chunk - 1) // per_chunk):
            s, e = c * per_chunk, min(kept, (c + 1) * per_chunk)
            acc += _dot(row_vals[s:e], row_offsets[s:e], v[c * 256 : (c + 1) * 256])
        y[0, r] = acc + bias[r]


CSR_VECTOR = _compile(_csr_vector)
CHUNK_VECTOR = _compile(_chunk_vector)
NM_VECTOR = _compile(_nm_vector)


# -- packing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Packed:
    """A pruned weight in one of the formats: ``arrays`` by name (numpy), and the shape."""

    format: str
    shape: tuple[int, int]
    arrays: dict[str, np.ndarray]
    m: int = 0
    n: int = 0


def pack_csr(weight: np.ndarray) -> Packed:
    """``csr`` of a 2-d float32 weight (zeros are the pruned entries)."""
    out, cols = weight.shape
    rows, columns = np.nonzero(weight)
    counts = np.bincount(rows, minlength=out)
    ptr = np.zeros(out + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    column_dtype = np.uint16 if cols <= 1 << 16 else np.int32
    return Packed(
        "csr", (out, cols),
        {"ptr": ptr, "cols": columns.astype(column_dtype),
         "vals": np.ascontiguousarray(weight[rows, columns], dtype=np.float32)},
    )  # fmt: skip


def pack_chunk(weight: np.ndarray) -> Packed:
    """``chunk`` of a 2-d float32 weight: 256-column chunks, one-byte offsets."""
    out, cols = weight.shape
    chunks = max(1, math.ceil(cols / CHUNK))
    rows, columns = np.nonzero(weight)  # row-major order: chunks ascend within a row
    segment = rows.astype(np.int64) * chunks + columns // CHUNK
    counts = np.bincount(segment, minlength=out * chunks)
    ptr = np.zeros(out * chunks + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return Packed(
        "chunk", (out, cols),
        {"ptr": ptr, "offsets": (columns % CHUNK).astype(np.uint8),
         "vals": np.ascontiguousarray(weight[rows, columns], dtype=np.float32)},
    )  # fmt: skip


def pack_nm(weight: np.ndarray, n: int, m: int) -> Packed:
    """``nm`` of a 2-d float32 weight whose every group of ``m`` consecutive inputs holds at
    most ``n`` non-zeros (``ValueError`` otherwise, or when m does not divide the inputs or
    256). Each group stores exactly n values (a group with fewer keeps zeros in its spare
    slots) and their columns as one-byte offsets within their chunk of 256 inputs."""
    out, cols = weight.shape
    if cols % m or CHUNK % m:
        raise ValueError(f"{m} must divide the {cols} inputs and {CHUNK} for a {n}:{m} layer")
    groups = weight.reshape(out, cols // m, m)
    nonzero = groups != 0
    if int(nonzero.sum(axis=2).max(initial=0)) > n:
        raise ValueError(f"the weight keeps more than {n} of {m} in some group")
    # stable order: non-zeros first, in position order; then the spare zero slots
    order = np.argsort(~nonzero, axis=2, kind="stable")[:, :, :n]
    vals = np.take_along_axis(groups, order, axis=2).astype(np.float32).reshape(out, -1)
    columns = order + (np.arange(cols // m) * m)[None, :, None]
    offsets = (columns % CHUNK).astype(np.uint8).reshape(out, -1)
    return Packed(
        "nm", (out, cols),
        {"offsets": np.ascontiguousarray(offsets), "vals": np.ascontiguousarray(vals)},
        m=m, n=n,
    )  # fmt: skip


def pack(weight: np.ndarray, format: str, n: int = 0, m: int = 0) -> Packed:
    """Pack ``weight`` (2-d float32) in ``format``."""
    if format == "csr":
        return pack_csr(weight)
    if format == "chunk":
        return pack_chunk(weight)
    if format == "nm":
        return pack_nm(weight, n, m)
    raise ValueError(f"unknown kernel format {format!r}; choose one of csr, chunk, nm")


def bind(packed: Packed, parallel: bool) -> tuple[Callable, tuple]:
    """(batch-1 kernel, its leading arguments) for ``packed``: the product is
    ``vector(*args, x, bias, y)`` (x: 1 × inputs, y: 1 × outputs); the same arguments serve
    the kernels of larger batches (:mod:`winnow.inference.tiled`)."""
    which = 1 if parallel else 0
    a = packed.arrays
    if packed.format == "csr":
        return CSR_VECTOR[which], (a["ptr"], a["cols"], a["vals"])
    if packed.format == "chunk":
        chunks = max(1, math.ceil(packed.shape[1] / CHUNK))
        return CHUNK_VECTOR[which], (a["ptr"], a["offsets"], a["vals"], chunks)
    per_chunk = CHUNK * packed.n // packed.m
    return NM_VECTOR[which], (a["offsets"], a["vals"], per_chunk)
