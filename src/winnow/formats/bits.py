"""Vectorised bit packing (numpy): unsigned integers of a fixed width, of varying widths, unary.

Layout, everywhere in :mod:`winnow.formats`: each value is written most significant bit first,
values follow each other with no gap, and the stream is padded with zero bits to a whole byte.
A stream of ``count`` values of ``width`` bits is therefore exactly ``ceil(count * width / 8)``
bytes. The unpacking functions check that length and that the padding bits are zero, and raise
:class:`SparseFileError` otherwise, so a corrupted stream is reported instead of misread.

No Python loop runs per element: values are spread into a bit matrix with ``np.unpackbits`` and
gathered back with ``np.packbits``, in chunks that bound the temporary memory.
"""

from __future__ import annotations

import numpy as np

from winnow.formats.errors import SparseFileError

MAX_WIDTH = 64
_CHUNK_BITS = 1 << 26  # bound on the temporary bit matrices (bytes)


def bit_width(max_value: int) -> int:
    """Bits needed to write every integer in ``[0, max_value]``: ``max_value.bit_length()``.

    ``bit_width(n - 1) == ceil(log2 n)`` for ``n >= 1``; ``bit_width(0) == 0``.
    """
    if max_value < 0:
        raise ValueError(f"bit_width of a negative number ({max_value})")
    return int(max_value).bit_length()


def packed_nbytes(count: int, width: int) -> int:
    """Bytes of ``count`` values of ``width`` bits: ``ceil(count * width / 8)``."""
    return (count * width + 7) // 8


def _word_bytes(width: int) -> int:
    """The smallest unsigned word (1, 2, 4 or 8 bytes) that holds ``width`` bits."""
    for size in (1, 2, 4, 8):
        if width <= 8 * size:
            return size
    raise ValueError(f"width {width} exceeds {MAX_WIDTH} bits")


def _check_width(width: int) -> None:
    if not 0 <= width <= MAX_WIDTH:
        raise ValueError(f"bit width {width} is outside [0, {MAX_WIDTH}]")


def _as_uint64(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    if values.size and values.dtype.kind == "i" and values.min() < 0:
        raise ValueError("cannot pack negative integers")
    return values.astype(np.uint64, copy=False)


def pack_uint(values: np.ndarray, width: int) -> np.ndarray:
    """Pack non-negative integers, each in ``width`` bits (0..64), into a uint8 array.

    Raises ``ValueError`` if a value does not fit in ``width`` bits.
    """
    _check_width(width)
    values = _as_uint64(values)
    if width == 0 or values.size == 0:
        if values.size and values.max() != 0:
            raise ValueError("non-zero values do not fit in 0 bits")
        return np.zeros(0, np.uint8)
    if width < 64 and values.max() >> np.uint64(width):
        raise ValueError(f"a value does not fit in {width} bits")
    size = _word_bytes(width)
    words = values.astype(f">u{size}").view(np.uint8).reshape(-1, size)
    if width % 8 == 0:  # whole bytes: keep the low ones
        return np.ascontiguousarray(words[:, size - width // 8 :]).reshape(-1)
    step = max(8, (_CHUNK_BITS // (8 * size)) // 8 * 8)  # a multiple of 8 values: whole bytes
    out = np.empty(packed_nbytes(values.size, width), np.uint8)
    for start in range(0, values.size, step):
        chunk = np.unpackbits(words[start : start + step], axis=1)[:, 8 * size - width :]
        packed = np.packbits(chunk.reshape(-1))
        first = start * width // 8
        out[first : first + packed.size] = packed
    return out


def _stream(data: np.ndarray | bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray) else data


def _check_length(data: np.ndarray, nbits: int, what: str) -> None:
    expected = (nbits + 7) // 8
    if data.size != expected:
        raise SparseFileError(
            f"{what}: stream holds {data.size} bytes, expected {expected} ({nbits} bits)"
        )
    spare = 8 * expected - nbits
    if spare and int(data[-1]) & ((1 << spare) - 1):
        raise SparseFileError(f"{what}: the padding bits of the stream are not zero")


def unpack_uint(
    data: np.ndarray | bytes, width: int, count: int, what: str = "stream"
) -> np.ndarray:
    """Read ``count`` integers of ``width`` bits written by :func:`pack_uint` (uint64 array).

    Raises :class:`SparseFileError` if ``data`` is not exactly that many bits plus zero padding.
    """
    _check_width(width)
    data = _stream(data)
    if count < 0:
        raise SparseFileError(f"{what}: negative count {count}")
    _check_length(data, count * width, what)
    if width == 0 or count == 0:
        return np.zeros(count, np.uint64)
    size = _word_bytes(width)
    if width % 8 == 0:
        words = np.zeros((count, size), np.uint8)
        words[:, size - width // 8 :] = data.reshape(count, width // 8)
        return words.reshape(-1).view(f">u{size}").astype(np.uint64)
    out = np.empty(count, np.uint64)
    step = max(8, (_CHUNK_BITS // (8 * size)) // 8 * 8)
    for start in range(0, count, step):
        n = min(step, count - start)
        first = start * width // 8
        chunk = data[first : first + packed_nbytes(n, width)]
        bits = np.unpackbits(chunk, count=n * width).reshape(n, width)
        full = np.zeros((n, 8 * size), np.uint8)
        full[:, 8 * size - width :] = bits
        out[start : start + n] = np.packbits(full, axis=1).reshape(-1).view(f">u{size}")
    return out


def unpack_bits(data: np.ndarray | bytes, count: int, what: str = "stream") -> np.ndarray:
    """Read ``count`` single bits (a bitmap) as a uint8 array of 0 and 1; checks the length."""
    data = _stream(data)
    if count < 0:
        raise SparseFileError(f"{what}: negative count {count}")
    _check_length(data, count, what)
    return np.unpackbits(data, count=count)


def pack_varwidth(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Pack ``values[i]`` in ``widths[i]`` bits (each 0..64), one after the other.

    The stream is ``ceil(sum(widths) / 8)`` bytes. A reader must know the widths first (they
    come from another stream), as :func:`unpack_varwidth` does.
    """
    values = _as_uint64(values)
    widths = np.asarray(widths, np.int64).reshape(-1)
    if values.shape != widths.shape:
        raise ValueError("values and widths differ in length")
    if widths.size and (widths.min() < 0 or widths.max() > MAX_WIDTH):
        raise ValueError(f"widths must be in [0, {MAX_WIDTH}]")
    fits = widths >= 64
    fits[~fits] = (values[~fits] >> widths[~fits].astype(np.uint64)) == 0
    if not fits.all():
        raise ValueError("a value does not fit in its width")
    parts = []
    step = max(1, _CHUNK_BITS // 64)
    for start in range(0, values.size, step):
        words = values[start : start + step].astype(">u8").view(np.uint8).reshape(-1, 8)
        bits = np.unpackbits(words, axis=1)
        keep = np.arange(64) >= (64 - widths[start : start + step, None])
        parts.append(bits[keep])
    return np.packbits(np.concatenate(parts)) if parts else np.zeros(0, np.uint8)


def unpack_varwidth(
    data: np.ndarray | bytes, widths: np.ndarray, what: str = "stream"
) -> np.ndarray:
    """Read the values written by :func:`pack_varwidth` with these ``widths`` (uint64 array)."""
    data = _stream(data)
    widths = np.asarray(widths, np.int64).reshape(-1)
    if widths.size and (widths.min() < 0 or widths.max() > MAX_WIDTH):
        raise SparseFileError(f"{what}: widths outside [0, {MAX_WIDTH}]")
    total = int(widths.sum())
    _check_length(data, total, what)
    bits = np.unpackbits(data, count=total)
    out = np.empty(widths.size, np.uint64)
    step = max(1, _CHUNK_BITS // 64)
    offset = 0
    for start in range(0, widths.size, step):
        w = widths[start : start + step]
        keep = np.arange(64) >= (64 - w[:, None])
        used = int(w.sum())
        full = np.zeros((w.size, 64), np.uint8)
        full[keep] = bits[offset : offset + used]
        offset += used
        out[start : start + w.size] = np.packbits(full, axis=1).reshape(-1).view(">u8")
    return out


def pack_unary(values: np.ndarray) -> np.ndarray:
    """Unary code: ``v`` zero bits then a one bit, for each value; ``sum(values) + len`` bits."""
    values = _as_uint64(values)
    if values.size == 0:
        return np.zeros(0, np.uint8)
    ends = np.cumsum(values + np.uint64(1)) - np.uint64(1)
    bits = np.zeros(int(ends[-1]) + 1, np.uint8)
    bits[ends.astype(np.int64)] = 1
    return np.packbits(bits)


def unary_nbits(values: np.ndarray) -> int:
    """Bits of :func:`pack_unary` for ``values``: ``sum(values) + len(values)``."""
    values = np.asarray(values)
    return int(values.sum(dtype=np.uint64)) + values.size


def unpack_unary(data: np.ndarray | bytes, count: int, what: str = "stream") -> np.ndarray:
    """Read ``count`` values written by :func:`pack_unary` (uint64 array).

    The stream must end in the byte of its last one bit, with zero padding after it.
    """
    data = _stream(data)
    if count < 0:
        raise SparseFileError(f"{what}: negative count {count}")
    if count > 8 * data.size:
        raise SparseFileError(
            f"{what}: {count} unary values cannot fit in {data.size} bytes (truncated?)"
        )
    ones = np.flatnonzero(np.unpackbits(data))
    if ones.size != count:
        raise SparseFileError(f"{what}: holds {ones.size} unary values, expected {count}")
    nbits = int(ones[-1]) + 1 if count else 0
    _check_length(data, nbits, what)
    return np.diff(ones, prepend=-1).astype(np.uint64) - np.uint64(1)
