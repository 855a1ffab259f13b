"""SynFlow: Iterative Synaptic Flow Pruning (Tanaka, Kunin, Yamins & Ganguli 2020, NeurIPS)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from winnow.criteria._registry import register
from winnow.criteria.data import DataSource, model_device
from winnow.data import DataSplits


def input_shape_of(data: DataSource | None, input_shape) -> tuple[int, ...]:
    """The per-sample input shape, from ``input_shape`` or from the data (only its shape)."""
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    if isinstance(data, DataSplits):
        return tuple(data.input_shape)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        return tuple(data[0].shape[1:])
    raise ValueError("synflow needs the input shape: pass input_shape=(C, H, W) or the data")


@register("synflow")
def synflow(
    work: nn.Module,
    params: dict[str, nn.Parameter],
    data: DataSource | None = None,
    input_shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """SynFlow (Tanaka et al. 2020): ``|θ ⊙ ∂R/∂θ|``, data-free.

    In eval mode, every floating-point tensor of the state_dict (weights, biases, BatchNorm
    affine parameters and running statistics) is replaced by its absolute value; R is the sum
    of the output for an all-ones input of one sample. The data, if given, is used only for
    its input shape. The product of many layers overflows float32 on deep networks, so the
    computation runs in ``dtype`` (float64 by default) and the scores are returned in it;
    ``ValueError`` if R is not finite even so.
    """
    shape = input_shape_of(data, input_shape)
    work.to(dtype).eval()
    with torch.no_grad():
        for tensor in work.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
    ones = torch.ones((1, *shape), dtype=dtype, device=model_device(work))
    flow = work(ones).sum()
    if not math.isfinite(float(flow.detach())):
        raise ValueError(
            f"synflow: R = {float(flow.detach())} overflows {dtype}; try dtype=torch.float64"
        )
    grads = torch.autograd.grad(flow, list(params.values()))
    return {n: (p.detach() * g).abs() for (n, p), g in zip(params.items(), grads, strict=True)}
