"""Tensor files: a state_dict (or any named tensors) with JSON metadata, checksummed.

The file the run store keeps its weights in and structured pruning its architecture spec and
weights in; a ``winnow.tensors`` container (:mod:`winnow.io.container`): one entry per
tensor (its dtype and shape), the metadata in the header, and a checksum over both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from winnow.io.container import WinnowFileError, read_container, write_container
from winnow.io.jsondata import to_json

KIND = "winnow.tensors"


class TensorFileError(WinnowFileError):
    """A tensor file is truncated, corrupted, or not a winnow tensor file."""


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``tensors`` (copied to the CPU) and ``metadata`` (JSON data; NaN stored as null)
    to a checksummed tensor file, atomically; return the path."""
    entries, arrays = {}, {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        arrays[name] = tensor
        entries[name] = {
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
        }
    return write_container(path, KIND, entries, arrays, to_json(dict(metadata or {}), "metadata"))


def _read(path: str | os.PathLike, read_arrays: bool):
    return read_container(
        path, KIND, error=TensorFileError, what="winnow tensor file", read_arrays=read_arrays
    )


def load_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a file written by :func:`save_tensors`, in the order they were saved,
    after verifying every checksum; never unpickles. :class:`TensorFileError` (a
    ``ValueError``) names the file for anything damaged."""
    container = _read(path, True)
    return {name: container.arrays[name] for name in container.order}


def tensor_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` saved with :func:`save_tensors` (the header is read and verified; the
    tensors are not read)."""
    return _read(path, False).metadata
