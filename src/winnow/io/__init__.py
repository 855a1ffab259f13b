"""Files: atomic writes, JSON data, and the one checksummed tensor container (stage 0).

Everything winnow writes goes through here, so every file is written the same way (a
temporary file created exclusively beside the target, fsynced, renamed) and every tensor file
is read by one reader that checks it before trusting it:

- :func:`atomic_write_bytes` (``atomic``): the only way winnow writes a file.
- :func:`to_json`, :func:`dumps` (``jsondata``): values as plain JSON data, canonical text.
- :func:`write_container`, :func:`read_container` (``container``): a safetensors file with
  winnow's JSON header (kind, version, order, per-entry fields, metadata), a checksum per
  entry over its fields and its bytes and one over the header; :class:`WinnowFileError` and
  its subclasses are the one error family of damaged or foreign files.
- :func:`save_tensors`, :func:`load_tensors`, :func:`tensor_metadata` (``tensor_file``): a
  state_dict with JSON metadata (run stores, structured specs), in that container.

This stage imports nothing else of winnow.
"""

from winnow.io.atomic import atomic_write_bytes
from winnow.io.container import (
    Container,
    WinnowFileError,
    read_container,
    sniff,
    write_container,
)
from winnow.io.jsondata import dumps, loads, to_json
from winnow.io.tensor_file import TensorFileError, load_tensors, save_tensors, tensor_metadata

__all__ = [
    "Container",
    "TensorFileError",
    "WinnowFileError",
    "atomic_write_bytes",
    "dumps",
    "load_tensors",
    "loads",
    "read_container",
    "save_tensors",
    "sniff",
    "tensor_metadata",
    "to_json",
    "write_container",
]
