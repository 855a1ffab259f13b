"""The one tensor container of winnow: safetensors with a checksummed JSON header.

Every tensor file winnow writes (mask files, sparse checkpoints, run-store tensors, structured
specs) is a safetensors file whose metadata holds one key, ``"winnow"``, with JSON text::

    {"format": "winnow.masks", "version": 2, "order": [names...],
     "entries": {name: {...fields of the kind..., "sha256": ...}},
     "metadata": {...}, "sha256": ...}

- An entry's arrays are the safetensors arrays named ``name`` or ``name#part`` (a sparse
  tensor's streams); every array belongs to exactly one entry.
- ``entries[name]["sha256"]`` is the SHA-256 of the entry's canonical JSON (without that key)
  followed, for each of its arrays in sorted order, by ``[key, dtype, shape]`` and its bytes:
  the checksum covers the bytes *and* the fields that give them meaning (shape, dtype, format
  parameters), so editing a shape in the header is detected like a flipped data bit.
- The header's own ``"sha256"`` covers its canonical JSON (without that key): the order of the
  names, the metadata and every entry (with its checksum).
- The JSON is canonical (sorted keys, compact) and it is the file's only metadata key, so the
  same tensors and fields always give the same bytes.

Reading trusts nothing: the marker (``"winnow.<kind>"`` in the raw safetensors header) is
looked for before any JSON is parsed, so a damaged winnow file is reported as damaged and
never taken for a foreign one; the header is bounded in size and nesting, checked against its
checksum, and the arrays against theirs. Files of version 1 (winnow 0.1: ``winnow.masks`` and
``winnow.sparse`` with their own per-entry checksums, ``winnow.tensors`` with one digest over
the tensors) are read by the same function. Every problem raises the caller's subclass of
:class:`WinnowFileError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from winnow.io.atomic import atomic_write_bytes
from winnow.io.jsondata import dumps, loads

VERSION = 2
"""The container version winnow writes."""
MARKER_KEY = "winnow"
"""The safetensors metadata key that holds winnow's header."""
MAX_HEADER_BYTES = 100 << 20
"""A safetensors header longer than this is refused before it is read (safetensors' own bound)."""


class WinnowFileError(ValueError):
    """A winnow file is truncated, corrupted, or not a winnow file of the expected kind.

    Raised (never a crash, a hang or a huge allocation) for anything a reader cannot trust.
    A ``ValueError``, so the ``winnow`` command reports it as one line. Each kind of file has
    its subclass (:class:`winnow.core.masks.MaskFileError`,
    :class:`winnow.formats.SparseFileError`, :class:`winnow.io.TensorFileError`).
    """


@dataclass
class Container:
    """What :func:`read_container` found: the header's parts and the arrays (or their shapes).

    ``arrays`` maps a safetensors key to its tensor (empty when read without arrays);
    ``shapes`` maps every key to ``(dtype, shape)`` as the safetensors header declares them.
    """

    path: Path
    kind: str
    version: int
    order: list[str]
    entries: dict[str, dict[str, Any]]
    metadata: dict[str, Any]
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    arrays: dict[str, Tensor] = field(default_factory=dict)
    _owned: dict[str, list[str]] | None = field(default=None, repr=False)

    def keys_of(self, name: str) -> list[str]:
        """The array keys of entry ``name``, sorted (``name`` and ``name#part``)."""
        if self._owned is None:
            self._owned = {}
            for key in sorted(self.shapes):
                self._owned.setdefault(_owner(key), []).append(key)
        return self._owned.get(name, [])


def _owner(key: str) -> str:
    return key.split("#", 1)[0]


# -- checksums -----------------------------------------------------------------------------------
def _entry_digest(entry: Mapping[str, Any], arrays: Mapping[str, Tensor]) -> str:
    sha = hashlib.sha256(dumps({k: v for k, v in entry.items() if k != "sha256"}).encode())
    for key in sorted(arrays):
        array = arrays[key]
        sha.update(dumps([key, str(array.dtype), list(array.shape)]).encode())
        sha.update(_bytes(array))
    return sha.hexdigest()


def _header_digest(header: Mapping[str, Any]) -> str:
    return hashlib.sha256(
        dumps({k: v for k, v in header.items() if k != "sha256"}).encode()
    ).hexdigest()


def _bytes(array: Tensor) -> memoryview:
    flat = array.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


# -- writing -------------------------------------------------------------------------------------
def write_container(
    path: str | os.PathLike,
    kind: str,
    entries: Mapping[str, Mapping[str, Any]],
    arrays: Mapping[str, Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a container of ``kind`` (``"winnow.masks"``, ...) atomically; return the path.

    ``entries`` maps each name (in order; no ``#`` in a name) to its JSON fields; ``arrays``
    maps ``name`` or ``name#part`` to CPU tensors (copied to contiguous memory). Checksums
    are added here. ``ValueError`` for an array without an entry, a name with ``#``, or
    fields that are not JSON data.
    """
    cpu = {k: a.detach().to("cpu").contiguous() for k, a in arrays.items()}
    for name in entries:
        if not isinstance(name, str) or "#" in name or not name:
            raise ValueError(f"invalid entry name {name!r} (a non-empty string without '#')")
    orphans = sorted(k for k in cpu if _owner(k) not in entries)
    if orphans:
        raise ValueError(f"arrays without an entry: {orphans[:3]}")
    by_owner: dict[str, dict[str, Tensor]] = {name: {} for name in entries}
    for key, array in cpu.items():
        by_owner[_owner(key)][key] = array
    table = {}
    for name, fields in entries.items():
        entry = dict(fields)
        entry["sha256"] = _entry_digest(entry, by_owner[name])
        table[name] = entry
    header = {
        "format": kind,
        "version": VERSION,
        "order": list(entries),
        "entries": table,
        "metadata": dict(metadata or {}),
    }
    try:
        header["sha256"] = _header_digest(header)
        text = dumps(header)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{kind} header is not JSON data: {err}") from None
    from safetensors.torch import save

    return atomic_write_bytes(path, save(cpu, metadata={MARKER_KEY: text}))


# -- reading -------------------------------------------------------------------------------------
def sniff(path: str | os.PathLike) -> str | None:
    """The winnow kind (``"winnow.sparse"``, ...) whose marker the raw safetensors header of
    ``path`` holds, or None (not a file, no safetensors header, or no winnow marker).

    Reads at most the header's bytes and parses nothing: a file whose header is damaged is
    still recognised as a winnow file, so its reader can report it as damaged.
    """
    raw = _raw_header(Path(path))
    found = None if raw is None else _MARKER.search(raw)
    return found.group(1).decode() if found else None


_MARKER = re.compile(rb'"format\\?"\s*:\s*\\?"(winnow\.(?:masks|sparse|tensors))\\?"')
"""``"format": "winnow.<kind>"`` in the raw header: inside the escaped JSON text of the
``"winnow"`` metadata key, or (version 1 tensor files) as a metadata key of its own."""


def _raw_header(path: Path) -> bytes | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return None
            (length,) = struct.unpack("<Q", prefix)
            return f.read(min(length, size - 8, MAX_HEADER_BYTES))
    except OSError:
        return None


def read_container(
    path: str | os.PathLike,
    kind: str,
    *,
    error: type[WinnowFileError] = WinnowFileError,
    what: str = "winnow file",
    read_arrays: bool = True,
) -> Container:
    """Read and verify a container of ``kind`` (version 1 or 2) written to ``path``.

    Raises ``FileNotFoundError`` for a missing file, and ``error`` (a subclass of
    :class:`WinnowFileError`) for a file without ``kind``'s marker ("not a winnow ...") or a
    damaged one: unreadable safetensors, invalid or too deeply nested JSON, another kind, a
    version newer than this winnow reads, names that do not match the arrays, a checksum
    mismatch of the header or of an entry (when ``read_arrays``). Arrays are verified as they
    are read; with ``read_arrays=False`` only the header is (``shapes`` still lists them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    if sniff(path) != kind:
        raise error(f"{path}: not a {what} (no {kind} marker)")
    from safetensors import SafetensorError, safe_open

    damaged = f"{path}: damaged {what}"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {}
            for key in f.keys():
                part = f.get_slice(key)
                shapes[key] = (_DTYPES.get(part.get_dtype()), tuple(part.get_shape()))
            arrays = {k: f.get_tensor(k) for k in f.keys()} if read_arrays else {}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        raise error(f"{damaged}: not readable as safetensors ({err})") from None
    if any(dtype is None for dtype, _ in shapes.values()):
        raise error(f"{damaged}: an array has a dtype winnow does not read")
    if MARKER_KEY in metadata:
        try:
            header = loads(metadata[MARKER_KEY])
        except ValueError as err:
            raise error(f"{damaged}: invalid header ({err})") from None
        parsed = _parse(header, path, kind, what, error, shapes, arrays)
    elif metadata.get("format") == kind == "winnow.tensors":
        parsed = _legacy_tensors(metadata, path, what, error, shapes, arrays)
    else:
        raise error(f"{damaged}: no {kind} header")
    return parsed


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


_LEGACY_TABLES = {"winnow.masks": "masks", "winnow.sparse": "tensors"}
"""Version 1 of masks and sparse checkpoints: the key of their per-entry table."""


def _parse(header, path, kind, what, error, shapes, arrays) -> Container:
    damaged = f"{path}: damaged {what}"
    if not isinstance(header, dict) or header.get("format") != kind:
        raise error(f"{damaged}: its header is not a {kind} header")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise error(f"{damaged}: invalid version {version!r}")
    if version > VERSION:
        raise error(f"{path}: {what} version {version} is newer than this winnow reads ({VERSION})")
    table_key = "entries" if version >= 2 else _LEGACY_TABLES.get(kind)
    order, entries = header.get("order"), header.get(table_key)
    if (
        not isinstance(order, list)
        or not all(isinstance(n, str) and n and "#" not in n for n in order)
        or len(set(order)) != len(order)
        or not isinstance(entries, dict)
        or set(order) != set(entries)
        or not all(isinstance(e, dict) for e in entries.values())
    ):
        raise error(f"{damaged}: its names do not match its entries")
    orphans = sorted(k for k in shapes if _owner(k) not in entries)
    if orphans:
        raise error(f"{damaged}: arrays {orphans[:3]} belong to no entry")
    metadata = header.get("metadata", {})
    if not isinstance(metadata, dict):
        raise error(f"{damaged}: invalid metadata")
    container = Container(path, kind, version, order, entries, metadata, shapes, arrays)
    if version >= 2:
        if header.get("sha256") != _header_digest(header):
            raise error(f"{damaged}: header checksum mismatch (its fields were changed)")
        check = _check_entry
    else:
        check = _legacy_check
    if arrays:
        for name in order:
            if not check(container, name):
                raise error(f"{damaged}: checksum mismatch for {name!r} (corrupted)")
    return container


def _check_entry(container: Container, name: str) -> bool:
    own = {k: container.arrays[k] for k in container.keys_of(name)}
    return container.entries[name].get("sha256") == _entry_digest(container.entries[name], own)


def _legacy_check(container: Container, name: str) -> bool:
    """Version 1: a mask's SHA-256 of its packed bits; a sparse tensor's of its streams."""
    entry = container.entries[name]
    if container.kind == "winnow.masks":
        if name not in container.arrays:
            return False
        return entry.get("sha256") == hashlib.sha256(_bytes(container.arrays[name])).hexdigest()
    streams = entry.get("streams")
    if not isinstance(streams, dict):
        return False
    sha = hashlib.sha256()
    for stream in streams:
        key = f"{name}#{stream}"
        if key in container.arrays:
            sha.update(_bytes(container.arrays[key]))
    return entry.get("streams_sha256") == sha.hexdigest()


def _legacy_tensors(metadata, path, what, error, shapes, arrays) -> Container:
    """Version 1 of ``winnow.tensors``: a digest over the tensors (names, dtypes, shapes,
    bytes in sorted name order) and the metadata as JSON text, both in safetensors metadata."""
    damaged = f"{path}: damaged {what}"
    try:
        extra = loads(metadata.get("metadata", "{}"))
    except ValueError as err:
        raise error(f"{damaged}: invalid metadata ({err})") from None
    if not isinstance(extra, dict) or "#" in "".join(shapes):
        raise error(f"{damaged}: invalid metadata")
    order = sorted(shapes)
    entries = {
        name: {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
        for name, (dtype, shape) in shapes.items()
    }
    if arrays:
        import json

        sha = hashlib.sha256()
        for name in order:
            tensor = arrays[name]
            sha.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
            sha.update(_bytes(tensor))
        if sha.hexdigest() != metadata.get("sha256"):
            raise error(f"{damaged}: checksum mismatch (corrupted)")
    return Container(path, "winnow.tensors", 1, order, entries, extra, shapes, arrays)
