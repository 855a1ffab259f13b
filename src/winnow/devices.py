"""Where computation runs: a device name checked before any work starts (stage 0)."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device that does not exist here (CUDA asked on a machine without it, a bad name)."""


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine (None: the CPU).

    Raises :class:`DeviceError` with one line that says what is missing, instead of torch's
    ``AssertionError: Torch not compiled with CUDA enabled`` halfway through a run.
    """
    if device is None:
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r}: write cpu, cuda, cuda:1, mps, ...") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU found"
            raise DeviceError(
                f"device {str(device)!r} asked, but CUDA is not available here ({why}, torch "
                f"{torch.__version__}); use cpu"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(f"device {str(device)!r} asked, but this machine has {count} GPU(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r} asked, but MPS is not available here; use cpu")
    return resolved
