"""A pruned model to an ONNX file that runs anywhere (ONNX Runtime, TensorRT, OpenVINO).

:func:`export_onnx` exports a plain copy of the model (unwrapped, masks baked in as exact
zeros, eval mode) with PyTorch's TorchScript-based exporter (``dynamo=False``): it needs the
``onnx`` package only (``pip install 'winnow[onnx]'``), where torch's default exporter also
needs ``onnxscript``. The batch dimension of every input and output is dynamic; the file is
written atomically; when ONNX Runtime is installed, the exported graph is run on the example
and its outputs compared with PyTorch's.

Pruned weights are stored as dense zeros: ONNX has no sparse weight that runtimes execute
faster. For a smaller file, :func:`winnow.save_sparse`; for a smaller network,
:func:`winnow.shrink` (channel pruning) before exporting.
"""

from __future__ import annotations

import importlib.util
import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from winnow.core.interop import plain_copy
from winnow.core.masks import Masks
from winnow.io.atomic import atomic_write_bytes


def export_onnx(
    model: nn.Module,
    example: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    masks: Masks | None = None,
    opset: int = 17,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Path:
    """Export ``model`` (with ``masks`` applied, if given) to the ONNX file ``path``.

    ``example`` is what the model is called with: a tensor, a tuple of positional tensors, or a
    dict of keyword tensors (a Hugging Face batch without its labels); its values matter only
    for the check. ``model`` is not changed. With ``check`` and ONNX Runtime installed, the
    file is run on ``example`` and every output must match PyTorch's within ``rtol``/``atol``
    (``ValueError`` otherwise, and nothing is written).

    Raises:
        ImportError: the ``onnx`` package is missing (``pip install 'winnow[onnx]'``).
    """
    if importlib.util.find_spec("onnx") is None:
        raise ImportError("exporting to ONNX needs the onnx package: pip install 'winnow[onnx]'")
    plain = plain_copy(model).to("cpu").eval()
    if masks is not None:
        masks.cpu().apply(plain)
    args, kwargs, input_names = _arguments(example)
    with torch.no_grad():
        expected = _flat_outputs(plain(*args, **kwargs))
    output_names = [f"output_{i}" if len(expected) > 1 else "output" for i in range(len(expected))]
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            plain,
            args,
            buffer,
            kwargs=kwargs or None,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes if dynamic_batch else None,
            opset_version=opset,
            dynamo=False,
        )
    data = buffer.getvalue()
    if check and importlib.util.find_spec("onnxruntime") is not None:
        _compare(data, dict(zip(input_names, [*args, *kwargs.values()], strict=True)), expected,
                 rtol, atol)  # fmt: skip
    return atomic_write_bytes(path, data)


def _arguments(example: Any) -> tuple[tuple, dict, list[str]]:
    if isinstance(example, Tensor):
        return (example.cpu(),), {}, ["input"]
    if isinstance(example, Mapping):
        kwargs = {k: v.cpu() for k, v in example.items() if isinstance(v, Tensor)}
        return (), kwargs, list(kwargs)
    if isinstance(example, (tuple, list)):
        args = tuple(t.cpu() for t in example)
        return args, {}, [f"input_{i}" for i in range(len(args))]
    raise TypeError(f"example must be a tensor, a tuple or a dict of tensors, not {example!r}")


def _flat_outputs(output: Any) -> list[Tensor]:
    """The tensors of a model's output in the order the exporter flattens them."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):  # Hugging Face ModelOutput too: its non-None fields
        return [t for v in output.values() for t in _flat_outputs(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _flat_outputs(v)]
    return []


def _compare(data: bytes, feeds: dict[str, Tensor], expected: list[Tensor], rtol, atol) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    known = {i.name for i in session.get_inputs()}
    got = session.run(None, {k: v.numpy() for k, v in feeds.items() if k in known})
    if len(got) != len(expected):
        raise ValueError(f"the ONNX graph has {len(got)} outputs, the model {len(expected)}")
    for i, (ours, theirs) in enumerate(zip(expected, got, strict=True)):
        theirs = torch.from_numpy(theirs)
        if ours.shape != theirs.shape or not torch.allclose(
            ours.float(), theirs.float(), rtol=rtol, atol=atol
        ):
            worst = (
                float((ours.float() - theirs.float()).abs().max())
                if ours.shape == theirs.shape
                else None
            )
            raise ValueError(
                f"the exported ONNX graph's output {i} differs from PyTorch's "
                f"(shapes {tuple(ours.shape)} and {tuple(theirs.shape)}, largest difference "
                f"{worst}); nothing was written"
            )
