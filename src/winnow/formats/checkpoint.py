"""Sparse checkpoints: one safetensors file of encoded streams with JSON metadata.

Layout: a ``winnow.sparse`` container (:mod:`winnow.io.container`): every tensor ``name``
becomes uint8 arrays ``"{name}#{stream}"`` (its index streams and its ``values`` stream; empty
streams are not stored), and its entry in the JSON header says how to decode them::

    {"format": "csr", "shape": [300, 784], "dtype": "float32", "nnz": 23520,
     "params": {...}, "codec": "raw",
     "streams": {"indices": nbytes, "indptr": nbytes, "values": nbytes},
     "decoded_sha256": sha256 of the decoded tensor's little-endian bytes,
     "sha256": the container's checksum over these fields and the streams}

Loading never unpickles and trusts nothing it reads: the container checks the header's and
each entry's checksum (fields and streams); the entry is validated (known format, dtype and
codec; shapes, counts and parameters in range and consistent with the stream sizes; at most
``max_tensor_bytes`` per decoded tensor) before anything is allocated; every decoder's output
is checked, and the decoded tensor is compared with its own checksum. Every problem is a
:class:`SparseFileError` naming the file and the tensor. Files of winnow 0.1 (version 1, with
``streams_sha256`` and ``sha256`` per entry) load the same way.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from winnow.core.interop import plain_state_dict
from winnow.formats import values as value_codecs
from winnow.formats.codec import assemble, decode_positions, encode
from winnow.formats.encodings import DTYPES, FORMATS, SparseView, bound_bits, dtype_name
from winnow.formats.errors import SparseFileError
from winnow.io import read_container, sniff, to_json, write_container

FILE_FORMAT = "winnow.sparse"


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


MAX_TOTAL_BYTES = min(1 << 36, (_physical_memory() or 1 << 36) // 2)
"""Default bound on all the decoded tensors of one file together: half of this machine's
memory, at most 64 GiB. A sparse file can be tiny and decode to a huge tensor (a COO tensor of
2^28 zeros is a few hundred bytes); claims beyond the bound are refused before anything is
decoded or hashed (pass a larger bound to load such a file on purpose)."""
MAX_TENSOR_BYTES = min(1 << 34, MAX_TOTAL_BYTES)
"""Default bound on one decoded tensor (16 GiB, or less on a machine with less memory)."""
_MAX_NDIM = 64
_SHA = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorInfo:
    """How one tensor is (or would be) stored: format, sizes and distance to the bound."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    format: str
    nnz: int
    codec: str
    index_nbytes: int
    value_nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def density(self) -> float:
        """Fraction of non-zero entries, in [0, 1] (1 for an empty tensor)."""
        return self.nnz / self.numel if self.numel else 1.0

    @property
    def nbytes(self) -> int:
        """Stored bytes: index streams plus the (possibly compressed) value stream."""
        return self.index_nbytes + self.value_nbytes

    @property
    def index_bits_per_nonzero(self) -> float:
        return 8 * self.index_nbytes / self.nnz if self.nnz else float("inf")

    @property
    def bound_bits(self) -> float:
        """``log2 C(n, m)`` plus ``m`` raw values: the least any index + raw values can take."""
        return bound_bits(self.numel, self.nnz, DTYPES[self.dtype])

    @property
    def ratio_to_bound(self) -> float:
        """Stored bits over :attr:`bound_bits` (below 1 only with compressed values)."""
        bound = self.bound_bits
        return 8 * self.nbytes / bound if bound else (1.0 if self.nbytes == 0 else float("inf"))


def _state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(model_or_state_dict, nn.Module):  # the names a plain instance loads
        return plain_state_dict(model_or_state_dict)
    if not isinstance(model_or_state_dict, Mapping):
        raise TypeError("expected an nn.Module or a mapping of names to tensors")
    state = {}
    for name, tensor in model_or_state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        state[name] = tensor
    return state


def _format_for(format: str | Mapping[str, str], name: str) -> str:
    chosen = format.get(name, "auto") if isinstance(format, Mapping) else format
    if chosen != "auto" and chosen not in FORMATS:
        raise ValueError(f"unknown format {chosen!r} (known: auto, {', '.join(FORMATS)})")
    return chosen


def _sha(*arrays: np.ndarray) -> str:
    sha = hashlib.sha256()
    for data in arrays:
        sha.update(np.ascontiguousarray(data).data)
    return sha.hexdigest()


def encode_state(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    format: str | Mapping[str, str] = "auto",
    compress_values: bool = False,
    level: int = value_codecs.DEFAULT_LEVEL,
) -> tuple[dict[str, np.ndarray], dict[str, Any], list[TensorInfo]]:
    """Encode a state_dict: the arrays and the header entries of a checkpoint, and a summary."""
    state = _state_dict(model_or_state_dict)
    if isinstance(format, Mapping) and set(format) - set(state):
        raise ValueError(f"formats given for unknown tensors: {sorted(set(format) - set(state))}")
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, Any] = {}
    infos = []
    addresses: set[int] = set()
    for name, tensor in state.items():
        view = SparseView.of(tensor)
        encoded = encode(view, _format_for(format, name))
        codec, value_stream = (
            value_codecs.compress(encoded.values, view.itemsize, level)
            if compress_values
            else ("raw", encoded.values)
        )
        streams = {**encoded.streams, "values": value_stream}
        for stream, data in streams.items():
            if data.size:  # empty streams are implied by their size, 0, in the metadata
                array = np.ascontiguousarray(data, np.uint8)
                address = array.__array_interface__["data"][0]
                if address in addresses:  # a tied weight's stream: its own copy on disk
                    array = array.copy()
                addresses.add(address)
                arrays[f"{name}#{stream}"] = array
        entries[name] = {
            "format": encoded.format,
            "shape": list(view.shape),
            "dtype": dtype_name(view.dtype),
            "nnz": view.m,
            "params": encoded.params,
            "codec": codec,
            "streams": {s: int(d.size) for s, d in streams.items()},
            "decoded_sha256": _sha(view.words.view(np.uint8)),
        }
        infos.append(
            TensorInfo(
                name,
                view.shape,
                dtype_name(view.dtype),
                encoded.format,
                view.m,
                codec,
                encoded.index_nbytes,
                int(value_stream.size),
            )
        )
    return arrays, entries, infos


def save_sparse(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike,
    format: str | Mapping[str, str] = "auto",
    compress_values: bool = False,
    level: int = value_codecs.DEFAULT_LEVEL,
    metadata: Mapping[str, Any] | None = None,
) -> list[TensorInfo]:
    """Write every tensor of a model's state_dict (or of a state_dict) to one sparse file.

    Each tensor is encoded in ``format``: ``"auto"`` (the smallest by the exact size model of
    :func:`winnow.formats.choose_format`, ``"dense"`` when nothing beats storing it as it is),
    one of :data:`winnow.formats.FORMATS`, or a mapping from tensor name to format (missing
    names: auto). With ``compress_values`` the value bytes are compressed with zstandard
    (``level``), as they are or as byte planes, whichever is smaller (Hoefler et al. 2021, §2.2
    on storage; byte planes because trained weights' exponents have low entropy). ``metadata``
    (JSON-able) is stored alongside. The file is written atomically. Returns one
    :class:`TensorInfo` per tensor.
    """
    arrays, entries, infos = encode_state(model_or_state_dict, format, compress_values, level)
    try:
        extra = to_json(dict(metadata or {}), "metadata", finite=False)
    except TypeError as err:
        raise ValueError(f"metadata is not JSON-able: {err}") from None
    tensors = {k: torch.from_numpy(a if a.flags.writeable else a.copy()) for k, a in arrays.items()}
    write_container(Path(path), FILE_FORMAT, entries, tensors, extra)
    return infos


# -- reading -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    name: str
    format: str
    shape: tuple[int, ...]
    dtype: str
    nnz: int
    params: dict[str, Any]
    codec: str
    streams: dict[str, int]
    decoded_sha256: str

    def info(self) -> TensorInfo:
        index = sum(size for s, size in self.streams.items() if s != "values")
        return TensorInfo(
            self.name,
            self.shape,
            self.dtype,
            self.format,
            self.nnz,
            self.codec,
            index,
            self.streams["values"],
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path, name: str, raw: Any, max_tensor_bytes: int) -> _Entry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(raw, dict):
        raise SparseFileError(f"{where}: invalid metadata")
    fmt, dtype, shape = raw.get("format"), raw.get("dtype"), raw.get("shape")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise SparseFileError(f"{where}: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SparseFileError(f"{where}: unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(_is_int(s) and 0 <= s < 1 << 62 for s in shape)
    ):
        raise SparseFileError(f"{where}: invalid shape {shape!r}")
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    if numel * itemsize > max_tensor_bytes:
        raise SparseFileError(
            f"{where}: shape {shape} would take {numel * itemsize:,} bytes, more than "
            f"max_tensor_bytes={max_tensor_bytes:,} (corrupted, or pass a larger bound)"
        )
    nnz = raw.get("nnz")
    if not _is_int(nnz) or not 0 <= nnz <= numel:
        raise SparseFileError(f"{where}: invalid non-zero count {nnz!r} for shape {shape}")
    params, codec, streams = raw.get("params"), raw.get("codec"), raw.get("streams")
    if not isinstance(params, dict):
        raise SparseFileError(f"{where}: invalid parameters {params!r}")
    if not isinstance(codec, str) or codec not in value_codecs.CODECS:
        raise SparseFileError(f"{where}: unknown value codec {codec!r}")
    if not isinstance(streams, dict) or "values" not in streams:
        raise SparseFileError(f"{where}: invalid stream table")
    for stream, size in streams.items():
        if not _is_int(size) or size < 0:
            raise SparseFileError(f"{where}: invalid size {size!r} of stream {stream!r}")
    decoded = raw.get("decoded_sha256", raw.get("sha256"))  # version 1 called it "sha256"
    if not isinstance(decoded, str) or not _SHA.fullmatch(decoded):
        raise SparseFileError(f"{where}: invalid checksum")
    return _Entry(name, fmt, tuple(shape), dtype, nnz, params, codec, dict(streams), decoded)


def _open(
    path: str | os.PathLike, read: bool, max_tensor_bytes: int, max_total_bytes: int | None = None
) -> tuple[Path, list[_Entry], dict]:
    """The checkpoint's entries, validated (each against ``max_tensor_bytes``, all together
    against ``max_total_bytes``), and its arrays as numpy (their shapes, unread)."""
    container = read_container(
        path, FILE_FORMAT, error=SparseFileError, what="winnow sparse checkpoint", read_arrays=read
    )
    path = container.path
    entries = [
        _parse_entry(path, name, container.entries[name], max_tensor_bytes)
        for name in container.order
    ]
    total = sum(e.info().numel * DTYPES[e.dtype].itemsize for e in entries)
    if max_total_bytes is not None and total > max_total_bytes:
        raise SparseFileError(
            f"{path}: its tensors would decode to {total:,} bytes, more than "
            f"max_total_bytes={max_total_bytes:,} (corrupted, or pass a larger bound)"
        )
    if read:
        arrays = {k: a.numpy() for k, a in container.arrays.items()}
    else:
        arrays = {k: shape for k, (_, shape) in container.shapes.items()}
    _check_keys(path, entries, set(arrays))
    return path, entries, arrays


def _check_keys(path: Path, entries: list[_Entry], keys: set[str]) -> None:
    expected = {f"{e.name}#{s}" for e in entries for s, size in e.streams.items() if size}
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        raise SparseFileError(
            f"{path}: the arrays do not match the metadata (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )


def inspect_sparse(path: str | os.PathLike) -> list[TensorInfo]:
    """Per-tensor format, sizes and density of a sparse checkpoint (reads the header only).

    The metadata and the stream sizes are validated; checksums are verified by
    :func:`load_sparse`.
    """
    path, entries, shapes = _open(path, False, 1 << 62)
    for entry in entries:
        for stream, size in entry.streams.items():
            if size and list(shapes[f"{entry.name}#{stream}"]) != [size]:
                raise SparseFileError(f"{path}: tensor {entry.name!r}: stream {stream!r} size")
    return [entry.info() for entry in entries]


def _decode_entry(path: Path, entry: _Entry, arrays: Mapping[str, np.ndarray]) -> Tensor:
    where = f"{path}: tensor {entry.name!r}"
    streams = {}
    for stream, size in entry.streams.items():
        data = arrays[f"{entry.name}#{stream}"] if size else np.zeros(0, np.uint8)
        if data.dtype != np.uint8 or data.ndim != 1 or data.size != size:
            raise SparseFileError(f"{where}: stream {stream!r} is not {size} bytes")
        streams[stream] = data
    value_stream = streams.pop("values")
    dtype = DTYPES[entry.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = math.prod(entry.shape) if FORMATS[entry.format].stores_all_values else entry.nnz
    try:
        value_bytes = value_codecs.decompress(entry.codec, value_stream, itemsize, count, where)
        positions = decode_positions(entry.format, streams, entry.params, entry.shape, entry.nnz)
        tensor = assemble(positions, value_bytes, entry.shape, dtype)
    except SparseFileError as err:
        message = str(err)
        raise SparseFileError(
            message if message.startswith(str(path)) else f"{where}: {message}"
        ) from None
    except (ValueError, IndexError, OverflowError, TypeError, KeyError, MemoryError) as err:
        raise SparseFileError(f"{where}: cannot decode ({type(err).__name__}: {err})") from None
    if _sha(tensor.reshape(-1).view(torch.uint8).numpy()) != entry.decoded_sha256:
        raise SparseFileError(f"{where}: checksum mismatch of the decoded tensor (corrupted)")
    return tensor


def load_sparse(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    max_tensor_bytes: int = MAX_TENSOR_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> dict[str, Tensor]:
    """Read a file written by :func:`save_sparse`: the state_dict, bitwise as it was saved.

    Never unpickles. A truncated or corrupted file, a checksum mismatch, an unknown format,
    dtype or codec, or shapes and counts that the streams cannot hold raise
    :class:`SparseFileError` (a ``ValueError``) naming the file and the tensor; a tensor that
    would decode to more than ``max_tensor_bytes``, or a file whose tensors together would take
    more than ``max_total_bytes`` (default: half of this machine's memory), is refused before
    anything is decoded, allocated or hashed.
    """
    path, entries, arrays = _open(path, True, max_tensor_bytes, max_total_bytes)
    return {e.name: _decode_entry(path, e, arrays).to(map_location) for e in entries}


def sparse_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` a sparse checkpoint was saved with (its header only is read and
    checked; ``SparseFileError`` if it is damaged)."""
    container = read_container(
        path, FILE_FORMAT, error=SparseFileError, what="winnow sparse checkpoint", read_arrays=False
    )
    return dict(container.metadata)


def is_sparse_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` carries the sparse-checkpoint marker (found in the raw header, before
    any parsing: a damaged checkpoint is still one, and :func:`load_sparse` says what is
    wrong with it)."""
    return sniff(path) == FILE_FORMAT
