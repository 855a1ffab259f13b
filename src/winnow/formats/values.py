"""Lossless compression of a value stream: zstd, optionally after splitting into byte planes.

Trained weights are far from uniform bit patterns: their exponents cluster in a few values, so
the byte that holds the sign and the high exponent bits (and, for fp32, the next one) has low
entropy while the low mantissa bytes are close to random. Interleaved, zstd sees mostly noise;
split into byte planes (all first bytes, then all second bytes, ...) the predictable planes
compress and the random ones cost what they cost. Codecs:

- ``raw``: the little-endian words as they are;
- ``zstd``: zstandard of the words;
- ``zstd-planes``: zstandard of the byte planes (a per-byte transposition of the words).

:func:`compress` tries the codecs and keeps the smallest (``raw`` when nothing helps).
:func:`decompress` reads the frame header first and refuses any frame whose declared size is
not exactly the expected one, so a corrupted stream cannot make it allocate more than that.
"""

from __future__ import annotations

import numpy as np

from winnow.formats.errors import SparseFileError

CODECS = ("raw", "zstd", "zstd-planes")
DEFAULT_LEVEL = 12


def _zstd():
    try:
        import zstandard
    except ImportError:  # pragma: no cover - a declared dependency
        raise ImportError("value compression needs the zstandard package") from None
    return zstandard


def _planes(raw: np.ndarray, itemsize: int) -> np.ndarray:
    return np.ascontiguousarray(raw.reshape(-1, itemsize).T).reshape(-1)


def _unplanes(planes: np.ndarray, itemsize: int) -> np.ndarray:
    return np.ascontiguousarray(planes.reshape(itemsize, -1).T).reshape(-1)


def compress(
    raw: np.ndarray, itemsize: int, level: int = DEFAULT_LEVEL, codecs: tuple[str, ...] = CODECS
) -> tuple[str, np.ndarray]:
    """The smallest of ``codecs`` for the value bytes ``raw`` (uint8): ``(codec, stream)``."""
    raw = np.ascontiguousarray(raw, np.uint8).reshape(-1)
    unknown = set(codecs) - set(CODECS)
    if unknown:
        raise ValueError(f"unknown value codec {sorted(unknown)} (known: {', '.join(CODECS)})")
    best = ("raw", raw)
    if raw.size == 0:
        return best
    zstandard = _zstd()
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
    for codec in codecs:
        if codec == "raw" or (codec == "zstd-planes" and itemsize == 1):
            continue
        source = _planes(raw, itemsize) if codec == "zstd-planes" else raw
        stream = np.frombuffer(compressor.compress(source.tobytes()), np.uint8)
        if stream.size < best[1].size:
            best = (codec, stream)
    return best


def decompress(
    codec: str, stream: np.ndarray, itemsize: int, count: int, what: str = "values"
) -> np.ndarray:
    """The ``count * itemsize`` value bytes stored in ``stream`` with ``codec`` (uint8 array)."""
    expected = count * itemsize
    if not isinstance(codec, str) or codec not in CODECS:
        raise SparseFileError(f"{what}: unknown value codec {codec!r}")
    if codec == "raw":
        if stream.size != expected:
            raise SparseFileError(
                f"{what}: {stream.size} value bytes, expected {expected} ({count} values)"
            )
        return stream
    if expected == 0:
        raise SparseFileError(f"{what}: an empty value stream is stored raw")
    zstandard = _zstd()
    data = stream.tobytes()
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        declared = -2
    if declared != expected:
        raise SparseFileError(
            f"{what}: the zstd frame declares {declared} bytes, expected {expected}"
        )
    try:
        out = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=expected, allow_extra_data=False
        )
    except zstandard.ZstdError as err:
        raise SparseFileError(f"{what}: corrupted zstd stream ({err})") from None
    if len(out) != expected:
        raise SparseFileError(f"{what}: zstd stream holds {len(out)} bytes, expected {expected}")
    raw = np.frombuffer(out, np.uint8)
    return _unplanes(raw, itemsize) if codec == "zstd-planes" else raw
