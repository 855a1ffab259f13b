"""Layers that execute a pruned weight with one chosen kernel: :class:`SparseLinear` and
:class:`SparseConv1x1` (a 1×1 convolution is a product over channels at every position).

Kernels (the names :func:`winnow.inference.accelerate` chooses among):

- ``dense``: ``torch.nn.functional.linear`` on the masked weight (what a layer that does not
  gain keeps);
- ``torch-csr``, ``torch-bsr<b>``: torch's own sparse tensors (CSR; BSR with b×b blocks) times
  the dense input;
- ``cuda-2:4``: on a GPU with semi-structured sparsity (compute capability 8.0 and above), a
  2:4 weight as ``torch.sparse.to_sparse_semi_structured`` (fp16/bf16);
- ``csr``, ``chunk``, ``nm`` with ``-serial`` or ``-parallel``: winnow's compiled kernels
  (:mod:`winnow.inference.kernels`), CPU only.

The packed arrays are buffers, so ``state_dict`` holds them (and :meth:`dense_weight` gives
back the masked dense weight, exactly). Inference only: no gradient flows through the own
kernels (a forward pass that needs one raises).
"""

from __future__ import annotations

import math
import re
import warnings

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from winnow.inference import kernels, tiled

OWN_FORMATS = ("csr", "chunk", "nm")


def parse_kernel(kernel: str) -> tuple[str, dict]:
    """``("own", {"format": "chunk", "parallel": True})``, ``("torch-bsr", {"block": 8})``,
    ``("torch-csr", {})`` or ``("dense", {})``; ``ValueError`` for an unknown name."""
    if kernel in ("dense", "torch-csr", "cuda-2:4"):
        return kernel, {}
    match = re.fullmatch(r"torch-bsr(\d+)", kernel)
    if match:
        return "torch-bsr", {"block": int(match.group(1))}
    match = re.fullmatch(r"(csr|chunk|nm)-(serial|parallel)", kernel)
    if match:
        return "own", {"format": match.group(1), "parallel": match.group(2) == "parallel"}
    raise ValueError(
        f"unknown kernel {kernel!r}; kernels are dense, torch-csr, torch-bsr<b>, cuda-2:4, "
        "and csr|chunk|nm-serial|parallel"
    )


_NUMBA_THREADS = [0]
"""The thread count last given to numba (asking numba costs more than the small products)."""


def _threads() -> None:
    """Run numba's parallel kernels on as many threads as torch's intra-op pool."""
    wanted = torch.get_num_threads()
    if wanted != _NUMBA_THREADS[0]:
        numba.set_num_threads(max(1, min(wanted, numba.config.NUMBA_NUM_THREADS)))
        _NUMBA_THREADS[0] = wanted


class SparseLinear(nn.Module):
    """``y = x·Wᵀ + b`` for a pruned ``W`` with the kernel named ``kernel``.

    Build it with :meth:`from_weight`. ``pattern`` = (n, m) for the ``nm`` kernels.
    """

    def __init__(
        self, in_features: int, out_features: int, kernel: str, pattern: tuple[int, int] = (0, 0)
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = kernel
        self.kind, self.options = parse_kernel(kernel)
        self.pattern = tuple(pattern)
        self.bias: Tensor | None = None
        self._sparse: Tensor | None = None  # torch's sparse weight, rebuilt from buffers
        self._bound: tuple | None = None

    @classmethod
    def from_weight(
        cls, weight: Tensor, bias: Tensor | None, kernel: str, pattern: tuple[int, int] = (0, 0)
    ) -> SparseLinear:
        """A layer computing with ``weight`` (2-d, pruned entries exactly 0) and ``bias``."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, kernel, pattern)
        weight = weight.detach()
        if layer.kind in ("dense", "cuda-2:4") or layer.kind.startswith("torch"):
            layer.register_buffer("weight", weight.clone())
            if layer.kind != "dense":
                layer._torch_sparse()  # a shape the blocks do not divide fails here
        else:
            if weight.device.type != "cpu":
                raise ValueError(
                    f"kernel {kernel!r} runs on the CPU; the weight is on {weight.device}"
                )
            array = weight.to(torch.float32).contiguous().numpy()
            packed = kernels.pack(array, layer.options["format"], *pattern)
            for name, value in packed.arrays.items():
                layer.register_buffer(f"packed_{name}", torch.from_numpy(value))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel={self.kernel}"
        )

    def _packed(self) -> kernels.Packed:
        arrays = {
            name.removeprefix("packed_"): buffer.numpy()
            for name, buffer in self.named_buffers(recurse=False)
            if name.startswith("packed_")
        }
        fmt = self.options["format"]
        shape = (self.out_features, self.in_features)
        return kernels.Packed(fmt, shape, arrays, m=self.pattern[1], n=self.pattern[0])

    def _torch_sparse(self) -> Tensor:
        if self._sparse is None or self._sparse.device != self.weight.device:
            with warnings.catch_warnings():  # "sparse CSR tensor support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                if self.kind == "torch-csr":
                    self._sparse = self.weight.to_sparse_csr()
                elif self.kind == "cuda-2:4":
                    semi = torch.sparse.to_sparse_semi_structured
                    self._sparse = semi(self.weight)  # CUDA, fp16/bf16, a 2:4 weight
                else:
                    block = self.options["block"]
                    self._sparse = self.weight.to_sparse_bsr((block, block))
        return self._sparse

    def dense_weight(self) -> Tensor:
        """The masked dense weight this layer computes with (bitwise as given)."""
        if self.kind != "own":
            return self.weight.clone()
        packed = self._packed()
        a = packed.arrays
        out, cols = packed.shape
        dense = np.zeros((out, cols), dtype=np.float32)
        if packed.format == "csr":
            rows = np.repeat(np.arange(out), np.diff(a["ptr"]))
            dense[rows, a["cols"].astype(np.int64)] = a["vals"]
        elif packed.format == "chunk":
            chunks = max(1, math.ceil(cols / kernels.CHUNK))
            segment = np.repeat(np.arange(out * chunks), np.diff(a["ptr"]))
            rows, chunk = segment // chunks, segment % chunks
            dense[rows, chunk * kernels.CHUNK + a["offsets"].astype(np.int64)] = a["vals"]
        else:  # kept entry t of a row is in group t // n, at its chunk's start + its offset
            t = np.arange(a["vals"].shape[1])
            chunk_start = (t // packed.n) * packed.m // kernels.CHUNK * kernels.CHUNK
            columns = chunk_start[None, :] + a["offsets"].astype(np.int64)
            np.put_along_axis(dense, columns, a["vals"], axis=1)
        return torch.from_numpy(dense)

    def _apply(self, fn, recurse=True):
        self._bound = None  # buffers may move: bind the kernels again
        self._sparse = None
        return super()._apply(fn, recurse)

    def _bind(self):
        """The kernels and their arguments, on numpy views of the buffers (kept until the
        buffers move; loading a state_dict copies into them in place)."""
        if self._bound is None:
            parallel = self.options["parallel"]
            vector, args = kernels.bind(self._packed(), parallel)
            if self.bias is not None:
                bias = self.bias.detach().to(torch.float32).numpy()
            else:
                bias = np.zeros(self.out_features, dtype=np.float32)
            batch = tiled.BatchProduct(self.options["format"], parallel, args, vector, bias)
            self._bound = (vector, batch, args, bias, parallel)
        return self._bound

    def forward(self, x: Tensor) -> Tensor:
        kind = self.kind
        if kind == "dense":
            return F.linear(x, self.weight, self.bias)
        if kind == "cuda-2:4":
            return F.linear(x, self._torch_sparse(), self.bias)
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if kind != "own":
            y = torch.mm(self._torch_sparse(), flat.t().to(self.weight.dtype)).t()
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"kernel {self.kernel} is for inference: run under torch.no_grad()")
        if x.is_cuda:
            raise RuntimeError(f"kernel {self.kernel} runs on the CPU; the input is on {x.device}")
        vector, batch, args, bias, parallel = self._bound or self._bind()
        if parallel:
            _threads()
        if flat.dtype is not torch.float32 or not flat.is_contiguous():
            flat = flat.to(torch.float32).contiguous()
        data = flat.numpy()
        rows = data.shape[0]
        if rows == 1:
            y = np.empty((1, self.out_features), dtype=np.float32)
            vector(*args, data, bias, y)
        else:
            y = batch(data, self.out_features)
        out = torch.from_numpy(y)
        if x.dtype is not torch.float32:
            out = out.to(x.dtype)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)


class SparseConv1x1(nn.Module):
    """A 1×1 convolution (stride 1, no padding, one group) through a :class:`SparseLinear`
    over the channels of every position."""

    def __init__(self, linear: SparseLinear) -> None:
        super().__init__()
        self.linear = linear

    @property
    def kernel(self) -> str:
        return self.linear.kernel

    def dense_weight(self) -> Tensor:
        return self.linear.dense_weight()[:, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        moved = x.movedim(1, -1)
        return self.linear(moved).movedim(-1, 1)


def is_pointwise(conv: nn.Module) -> bool:
    """Whether ``conv`` is a 2-d 1×1 convolution with stride 1, no padding, one group."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )
