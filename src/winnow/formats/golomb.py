"""Golomb code of non-negative integers, split into three bit streams, with its exact size.

Golomb (1966) codes ``v`` with a parameter ``M >= 1`` as the quotient ``q = v // M`` in unary
(``q + 1`` bits) and the remainder ``r = v % M`` in truncated binary: with ``b = ceil(log2 M)``
and ``u = 2**b - M``, a remainder ``r < u`` takes ``b - 1`` bits and the others ``b`` bits (the
code ``r + u``). It is an optimal prefix code for geometrically distributed values (Gallager &
Van Voorhis 1975), which is what the gaps between the kept weights of a random mask are. Rice
codes are the special case ``M = 2**k``.

To decode without a per-value loop, the bits are not interleaved but stored in three streams:
``unary`` (the quotients), ``rem`` (the first ``b - 1`` bits of every remainder code, a fixed
width) and ``extra`` (the last bit of the ``b``-bit codes, in order). A reader knows from the
first ``b - 1`` bits ``x`` whether an extra bit follows (``x >= u``). The total is the size of
the interleaved code, plus at most two bytes of padding.
"""

from __future__ import annotations

import math

import numpy as np

from winnow.formats.bits import (
    bit_width,
    pack_uint,
    pack_unary,
    unary_nbits,
    unpack_uint,
    unpack_unary,
)
from winnow.formats.errors import SparseFileError

MAX_PARAMETER = 1 << 48
STREAMS = ("unary", "rem", "extra")


def _split(values: np.ndarray, parameter: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Quotients, first remainder bits ``x``, and the code's ``b`` and ``u``."""
    values = np.asarray(values, np.uint64).reshape(-1)
    if parameter == 1:
        return values, np.zeros(values.size, np.uint64), 0, 0
    m = np.uint64(parameter)
    q, r = values // m, values % m
    b = bit_width(parameter - 1)
    u = (1 << b) - parameter
    x = np.where(r < np.uint64(u), r, (r + np.uint64(u)) >> np.uint64(1))
    return q, x, b, u


def golomb_nbits(values: np.ndarray, parameter: int) -> tuple[int, int, int]:
    """Exact bits of the three streams (unary, rem, extra) for ``values`` and ``M = parameter``."""
    _check_parameter(parameter)
    values = np.asarray(values, np.uint64).reshape(-1)
    if parameter == 1:
        return unary_nbits(values), 0, 0
    m = np.uint64(parameter)
    b = bit_width(parameter - 1)
    u = (1 << b) - parameter
    unary = int((values // m).sum(dtype=np.uint64)) + values.size
    extra = int(np.count_nonzero(values % m >= np.uint64(u)))
    return unary, values.size * (b - 1), extra


def golomb_nbytes(values: np.ndarray, parameter: int) -> int:
    """Exact bytes of :func:`golomb_encode` (each stream padded to a byte)."""
    return sum((bits + 7) // 8 for bits in golomb_nbits(values, parameter))


def golomb_encode(values: np.ndarray, parameter: int) -> dict[str, np.ndarray]:
    """The three streams (``unary``, ``rem``, ``extra``) of the Golomb code of ``values``."""
    _check_parameter(parameter)
    q, x, b, u = _split(values, parameter)
    if parameter == 1:
        return {"unary": pack_unary(q), "rem": pack_uint(x[:0], 0), "extra": pack_uint(x[:0], 1)}
    r = np.asarray(values, np.uint64).reshape(-1) % np.uint64(parameter)
    long = r >= np.uint64(u)
    extra = (r[long] + np.uint64(u)) & np.uint64(1)
    return {"unary": pack_unary(q), "rem": pack_uint(x, b - 1), "extra": pack_uint(extra, 1)}


def golomb_decode(
    streams: dict[str, np.ndarray], parameter: int, count: int, what: str = "golomb"
) -> np.ndarray:
    """Read ``count`` values written by :func:`golomb_encode` (uint64 array).

    Raises :class:`SparseFileError` on a stream that is too short, too long, or malformed.
    """
    _check_parameter(parameter, SparseFileError)
    q = unpack_unary(streams["unary"], count, f"{what} unary")
    if parameter == 1:
        unpack_uint(streams["rem"], 0, 0, f"{what} rem")
        unpack_uint(streams["extra"], 1, 0, f"{what} extra")
        return q
    b = bit_width(parameter - 1)
    u = (1 << b) - parameter
    x = unpack_uint(streams["rem"], b - 1, count, f"{what} rem")
    long = x >= np.uint64(u)
    extra = unpack_uint(streams["extra"], 1, int(np.count_nonzero(long)), f"{what} extra")
    r = x.copy()
    r[long] = 2 * x[long] + extra - np.uint64(u)
    if q.size and int(q.max()) * parameter + parameter > (1 << 63):
        raise SparseFileError(f"{what}: decoded values overflow 63 bits")
    return q * np.uint64(parameter) + r


def best_parameter(values: np.ndarray, candidates: list[int] | None = None) -> tuple[int, int]:
    """The Golomb parameter with the fewest bytes for ``values``, and that size.

    Without ``candidates``: the optimum for a geometric law of the same mean (Gallager & Van
    Voorhis: ``M = ceil(log(1 + t) / -log t)``, ``t = mean / (mean + 1)``), its neighbours and the
    nearest powers of two, each sized exactly.
    """
    values = np.asarray(values, np.uint64).reshape(-1)
    if candidates is None:
        candidates = geometric_candidates(float(values.mean()) if values.size else 0.0)
    sizes = {m: golomb_nbytes(values, m) for m in sorted(set(candidates))}
    best = min(sizes, key=lambda m: (sizes[m], m))
    return best, sizes[best]


def geometric_candidates(mean: float) -> list[int]:
    """Golomb parameters worth sizing for values of this mean (see :func:`best_parameter`)."""
    if mean <= 0:
        return [1]
    t = mean / (mean + 1.0)
    guess = max(1, math.ceil(math.log1p(t) / -math.log(t))) if t < 1 else MAX_PARAMETER
    guess = min(guess, MAX_PARAMETER)
    near = {max(1, guess + d) for d in (-2, -1, 0, 1, 2)}
    power = 1 << max(0, bit_width(guess) - 1)
    near |= {power, min(2 * power, MAX_PARAMETER)}
    return sorted(near)


def _check_parameter(parameter: int, error: type[Exception] = ValueError) -> None:
    if not isinstance(parameter, int) or not 1 <= parameter <= MAX_PARAMETER:
        raise error(f"Golomb parameter {parameter!r} is outside [1, {MAX_PARAMETER}]")
