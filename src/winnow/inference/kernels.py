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
  their positions in the group as one byte each, with no pointers at all: 5 bytes a kept
  weight, 2.5 a weight at 2:4.

Every kernel runs its rows in parallel (numba's ``prange``; the ``serial`` variants run them in
the calling thread, which wins on small layers where starting threads costs more than the
product), accumulates in float32 with reassociation allowed (``fastmath``: the order of the
additions differs from a dense product, within float32 rounding), and takes the input as
``x`` (batch 1: a vector) or ``xt`` (batch B: the transposed input, inputs × B, so the B values
a kept weight multiplies are contiguous and vectorise). Outputs are written into ``y``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
from numba import prange

CHUNK = 256
"""Columns per chunk of the ``chunk`` format (so an offset fits in one byte)."""

_OPTIONS = dict(cache=True, nogil=True, fastmath=True, boundscheck=False)


def _compile(function):
    """(serial, parallel) compiled versions of a kernel."""
    return numba.njit(**_OPTIONS)(function), numba.njit(parallel=True, **_OPTIONS)(function)


# -- csr ------------------------------------------------------------------------------------
def _csr_vector(ptr, cols, vals, x, bias, y):
    v = x[0]
    for r in prange(y.shape[1]):
        acc = np.float32(0.0)
        for k in range(ptr[r], ptr[r + 1]):
            acc += vals[k] * v[cols[k]]
        y[0, r] = acc + bias[r]


def _csr_batch(ptr, cols, vals, xt, bias, yt):
    batch = xt.shape[1]
    for r in prange(yt.shape[0]):
        out = yt[r]
        for b in range(batch):
            out[b] = bias[r]
        for k in range(ptr[r], ptr[r + 1]):
            v = vals[k]
            row = xt[cols[k]]
            for b in range(batch):
                out[b] += v * row[b]


# -- chunk ----------------------------------------------------------------------------------
def _chunk_vector(ptr, offsets, vals, chunks, x, bias, y):
    v = x[0]
    for r in prange(y.shape[1]):
        acc = np.float32(0.0)
        first = r * chunks
        for c in range(chunks):
            base = c * 256
            for k in range(ptr[first + c], ptr[first + c + 1]):
                acc += vals[k] * v[base + offsets[k]]
        y[0, r] = acc + bias[r]


def _chunk_batch(ptr, offsets, vals, chunks, xt, bias, yt):
    batch = xt.shape[1]
    for r in prange(yt.shape[0]):
        out = yt[r]
        for b in range(batch):
            out[b] = bias[r]
        first = r * chunks
        for c in range(chunks):
            base = c * 256
            for k in range(ptr[first + c], ptr[first + c + 1]):
                v = vals[k]
                row = xt[base + offsets[k]]
                for b in range(batch):
                    out[b] += v * row[b]


# -- n:m ------------------------------------------------------------------------------------
def _nm_vector(positions, vals, m, x, bias, y):
    groups, n = vals.shape[1], vals.shape[2]
    v = x[0]
    for r in prange(y.shape[1]):
        acc = np.float32(0.0)
        for g in range(groups):
            base = g * m
            for j in range(n):
                acc += vals[r, g, j] * v[base + positions[r, g, j]]
        y[0, r] = acc + bias[r]


def _nm_batch(positions, vals, m, xt, bias, yt):
    groups, n = vals.shape[1], vals.shape[2]
    batch = xt.shape[1]
    for r in prange(yt.shape[0]):
        out = yt[r]
        for b in range(batch):
            out[b] = bias[r]
        for g in range(groups):
            base = g * m
            for j in range(n):
                v = vals[r, g, j]
                row = xt[base + positions[r, g, j]]
                for b in range(batch):
                    out[b] += v * row[b]


CSR_VECTOR = _compile(_csr_vector)
CSR_BATCH = _compile(_csr_batch)
CHUNK_VECTOR = _compile(_chunk_vector)
CHUNK_BATCH = _compile(_chunk_batch)
NM_VECTOR = _compile(_nm_vector)
NM_BATCH = _compile(_nm_batch)


# -- packing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Packed:
    """A pruned weight in one of the formats: ``arrays`` by name (numpy), and the shape."""

    format: str
    shape: tuple[int, int]
    arrays: dict[str, np.ndarray]
    m: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes the product reads from the weight (values and indices)."""
        return sum(a.nbytes for a in self.arrays.values())


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
    most ``n`` non-zeros (``ValueError`` otherwise, or when m does not divide the inputs).
    Groups with fewer keep zeros in the spare slots."""
    out, cols = weight.shape
    if cols % m:
        raise ValueError(f"{m} does not divide the {cols} inputs of a {n}:{m} layer")
    groups = weight.reshape(out, cols // m, m)
    nonzero = groups != 0
    if int(nonzero.sum(axis=2).max(initial=0)) > n:
        raise ValueError(f"the weight keeps more than {n} of {m} in some group")
    # stable order: non-zeros first, in position order; then the spare zero slots
    order = np.argsort(~nonzero, axis=2, kind="stable")[:, :, :n]
    vals = np.take_along_axis(groups, order, axis=2).astype(np.float32)
    return Packed(
        "nm", (out, cols),
        {"positions": order.astype(np.uint8), "vals": np.ascontiguousarray(vals)}, m=m,
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


def bind(packed: Packed, parallel: bool) -> tuple[Callable, Callable, tuple]:
    """(vector kernel, batch kernel, their leading arguments) for ``packed``: the product is
    ``vector(*args, x, bias, y)`` at batch 1 (x: 1 × inputs, y: 1 × outputs) and
    ``batch(*args, xt, bias, yt)`` otherwise."""
    which = 1 if parallel else 0
    a = packed.arrays
    if packed.format == "csr":
        return CSR_VECTOR[which], CSR_BATCH[which], (a["ptr"], a["cols"], a["vals"])
    if packed.format == "chunk":
        chunks = max(1, math.ceil(packed.shape[1] / CHUNK))
        args = (a["ptr"], a["offsets"], a["vals"], chunks)
        return CHUNK_VECTOR[which], CHUNK_BATCH[which], args
    return NM_VECTOR[which], NM_BATCH[which], (a["positions"], a["vals"], packed.m)


def multiply(packed: Packed, x: np.ndarray, bias: np.ndarray, parallel: bool) -> np.ndarray:
    """x (B, inputs) float32, C-contiguous -> y (B, outputs) float32 = x·Wᵀ + bias."""
    vector, batch, args = bind(packed, parallel)
    out = packed.shape[0]
    if x.shape[0] == 1:
        y = np.empty((1, out), dtype=np.float32)
        vector(*args, x, bias, y)
        return y
    yt = np.empty((out, x.shape[0]), dtype=np.float32)
    batch(*args, np.ascontiguousarray(x.T), bias, yt)
    return yt.T
