"""The one error type of :mod:`winnow.formats`."""

from __future__ import annotations

from winnow.io.container import WinnowFileError


class SparseFileError(WinnowFileError):
    """An encoded tensor or a sparse checkpoint is truncated, corrupted, or not understood.

    Raised (never a crash, a hang or a huge allocation) for a truncated or corrupted file, a
    checksum mismatch, an unknown format or dtype, and shapes or counts that the streams cannot
    hold. A ``ValueError``, so the ``winnow`` command reports it as one line.
    """
