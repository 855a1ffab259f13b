"""Sparse storage: encodings of a sparse tensor, their exact sizes, and sparse checkpoints.

Hoefler et al. 2021 (*Sparsity in Deep Learning*), §2.2: storing the ``m`` non-zeros of an
``n``-element tensor costs an index whose size depends on the format and on the density, and no
fixed format is best everywhere; the lower bound for the index is ``log₂ C(n, m)`` bits.

- :data:`FORMATS`: ``dense``, ``bitmap``, ``coo``, ``delta``, ``padded-delta``, ``csr``,
  ``csc`` and ``entropy`` (Golomb-coded gaps or enumerative blocks, within about 1.5% of the
  bound at every density), each an encoder, a decoder and an exact size model
  (:mod:`winnow.formats.encodings`).
- :func:`encode` / :func:`decode` (:mod:`.codec`): one tensor to streams and back, bitwise
  exactly, for float64, float32, float16, bfloat16, integer and bool tensors.
- :func:`format_sizes` / :func:`choose_format`: exact bytes per format without encoding, and
  the smallest.
- :func:`save_sparse` / :func:`load_sparse`: a state_dict to one safetensors file of encoded
  streams with checksummed JSON metadata, and back; loading never unpickles and reports any
  corruption as :class:`SparseFileError`. :func:`inspect_sparse` reads the header only.
- ``winnow pack | unpack | inspect``: the same from the command line (:mod:`winnow.cli.formats`).
- :func:`export_onnx` (:mod:`.onnx`): a pruned model to an ONNX file, checked against PyTorch.
"""

from winnow.formats.checkpoint import (
    TensorInfo,
    inspect_sparse,
    is_sparse_checkpoint,
    load_sparse,
    save_sparse,
)
from winnow.formats.choose import choose_format, format_sizes, index_bits_per_nonzero
from winnow.formats.codec import decode, encode
from winnow.formats.encodings import DTYPES, FORMATS, Encoded, SparseView, bound_bits
from winnow.formats.entropy import log2_binomial
from winnow.formats.errors import SparseFileError
from winnow.formats.onnx import export_onnx

__all__ = [
    "DTYPES",
    "FORMATS",
    "Encoded",
    "SparseFileError",
    "SparseView",
    "TensorInfo",
    "bound_bits",
    "choose_format",
    "decode",
    "encode",
    "export_onnx",
    "format_sizes",
    "index_bits_per_nonzero",
    "inspect_sparse",
    "is_sparse_checkpoint",
    "load_sparse",
    "log2_binomial",
    "save_sparse",
]
