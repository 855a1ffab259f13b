"""Compiled loops (numba) for selecting among millions of weights, round after round.

Each is one pass over its arrays: iterative pruning calls them a hundred times on tens of
millions of entries, where numpy would need several passes (compare, combine, index) and
temporary arrays for the same work. They compile on first use and are cached on disk.

Positions are offsets into the flat storage of a dense tensor; ``dense=True`` means "every
position, in order" (``positions`` is then ignored and may be empty).
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)
_parallel = numba.njit(cache=True, nogil=True, boundscheck=False, parallel=True)


@_jit
def _finite(v, low, high):
    v = v if v >= low else low  # NaN and -inf fail the comparison
    return v if v <= high else high


# The loops run over whole arrays (slices of the caller's): ``range(start, end)`` bounds keep
# LLVM from vectorising them (measured 7x slower for the band's counting loop).


@_jit
def _gather_part(a, b, product, positions, dense, low, high, out):
    bad = 0
    if dense:
        for i in range(out.size):
            v = abs(a[i] * b[i]) if product else a[i]
            bad += np.int64(not ((v >= low) & (v <= high)))
            out[i] = _finite(v, low, high)
    else:
        for i in range(out.size):
            p = np.uintp(positions[i])
            v = abs(a[p] * b[p]) if product else a[p]
            bad += np.int64(not ((v >= low) & (v <= high)))
            out[i] = _finite(v, low, high)
    return bad


@_parallel
def _gather_parallel(a, b, product, positions, dense, low, high, out, bad):
    """``out[i]``: the score at ``p = positions[i]`` (``p = i`` if ``dense``), ``|a[p] *
    b[p]|`` if ``product`` (in the arrays' dtype, as torch forms it) else ``a[p]``; NaN and
    values below ``low`` (-inf) become ``low``, values above ``high`` (+inf) ``high``. In
    ``bad.size`` parallel parts, each of which writes to ``bad[c]`` how many of its values
    were outside [low, high] (NaN included)."""
    n = out.size
    chunks = bad.size
    for c in numba.prange(chunks):
        lo, hi = c * n // chunks, (c + 1) * n // chunks
        if dense:
            bad[c] = _gather_part(
                a[lo:hi], b[lo:hi], product, positions, dense, low, high, out[lo:hi]
            )
        else:
            bad[c] = _gather_part(a, b, product, positions[lo:hi], dense, low, high, out[lo:hi])


@_jit
def _band_part(values, low, high, inside):
    above = 0
    count = 0
    for i in range(values.size):
        v = values[i]
        flag = (v >= low) & (v <= high)
        above += np.int64(v > high)
        count += np.int64(flag)
        inside[i] = flag
    return above, count


@_parallel
def _band_parallel(values, low, high, inside, bounds, counts):
    """Count the values above ``high`` and those in [low, high], and flag the latter in
    ``inside``; in parallel parts ``bounds[c]:bounds[c + 1]``, whose two counts go to
    ``counts[c]``. (No branch and no store that depends on the data: the loop runs on vector
    instructions; :func:`flagged` then lists the positions.)"""
    for c in numba.prange(bounds.size - 1):
        lo, hi = bounds[c], bounds[c + 1]
        counts[c, 0], counts[c, 1] = _band_part(values[lo:hi], low, high, inside[lo:hi])


@_jit
def _flagged_part(flags, words, first, out):
    n = 0
    for w in range(words.size):
        if words[w]:
            for i in range(8 * (first + w), 8 * (first + w) + 8):
                if flags[i]:
                    out[n] = i
                    n += 1


@_parallel
def _flagged_parallel(flags, words, word_bounds, starts, out):
    """The positions of the true entries of ``flags`` (a boolean array whose length is a
    multiple of 8, also viewed as 64-bit ``words``) into ``out``: part c covers the words
    ``word_bounds[c]:word_bounds[c + 1]`` and writes from ``starts[c]`` on. Few flags are
    set, so most words are skipped whole."""
    for c in numba.prange(word_bounds.size - 1):
        lo, hi = word_bounds[c], word_bounds[c + 1]
        _flagged_part(flags, words[lo:hi], lo, out[starts[c] :])


@_jit
def compact(values, threshold, tied, all_tied, positions, dense, kept, removed):
    """Split the positions at a threshold: those whose value is above it, or equal to it and
    either ``all_tied`` or listed in ``tied`` (sorted indices into ``values``), go to ``kept``
    (which may be ``positions`` itself: it is written behind the read), the others to
    ``removed`` (as long as ``values``), both in order; returns (count kept, count removed).

    Both outputs are written at every step and only one count advances: no branch to mispredict
    where kept and removed weights alternate. (Parallel parts of one array gained nothing
    here; :func:`winnow.selection.run_balanced` runs tensors side by side instead.)"""
    k = 0
    r = 0
    j = 0
    for i in range(values.size):
        v = values[i]
        p = i if dense else positions[i]
        keep = v > threshold
        if v == threshold:
            if all_tied:
                keep = True
            elif j < tied.size and tied[j] == i:
                keep = True
                j += 1
        kept[k] = p
        removed[r] = p
        k += keep
        r += 1 - keep
    return k, r


@_jit
def scatter_zero(storage, positions):
    """``storage[positions] = 0``."""
    for i in range(positions.size):
        storage[positions[i]] = 0


@_jit
def flat_indices(positions, strides, steps, out):
    """``out[i]``: the flat index, in the default row-major order, of the entry at storage
    position ``positions[i]`` of a dense tensor whose dimensions, by decreasing storage stride,
    have the storage strides ``strides`` and the row-major strides ``steps``. (Quotients by a
    float reciprocal, corrected where rounding missed: integer division is the slow part of
    this loop.)"""
    inverse = 1.0 / strides
    for i in range(positions.size):
        rest = np.int64(positions[i])
        flat = 0
        for d in range(strides.size):
            coordinate = np.int64(rest * inverse[d])
            remainder = rest - coordinate * strides[d]
            while remainder < 0:
                coordinate -= 1
                remainder += strides[d]
            while remainder >= strides[d]:
                coordinate += 1
                remainder -= strides[d]
            rest = remainder
            flat += coordinate * steps[d]
        out[i] = flat


# The parallel loops run on numba's threads (OpenMP); with one part the plain loops run instead,
# so a process that must not start those threads (see winnow.selection._workers) never does.


def gather(a, b, product, positions, dense, low, high, out, chunks):
    """See :func:`_gather_parallel`; returns how many values were outside [low, high]."""
    if chunks > 1:
        bad = np.zeros(chunks, dtype=np.int64)
        _gather_parallel(a, b, product, positions, dense, low, high, out, bad)
        return int(bad.sum())
    return int(_gather_part(a, b, product, positions, dense, low, high, out))


def band(values, low, high, inside, bounds, counts):
    """See :func:`_band_parallel`."""
    if bounds.size > 2:
        _band_parallel(values, low, high, inside, bounds, counts)
    else:
        counts[0, 0], counts[0, 1] = _band_part(values, low, high, inside)


def flagged(flags, words, word_bounds, starts, out):
    """See :func:`_flagged_parallel`."""
    if word_bounds.size > 2:
        _flagged_parallel(flags, words, word_bounds, starts, out)
    else:
        _flagged_part(flags, words, 0, out)
