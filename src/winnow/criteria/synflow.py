"""SynFlow: Iterative Synaptic Flow Pruning (Tanaka, Kunin, Yamins & Ganguli 2020, NeurIPS)."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from winnow.core.scores import AbsProductScores
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


LINEARISED = "_winnow_synflow_linearised"
"""Set on a private copy once its state holds absolute values and it is in eval mode
(iterative SynFlow re-scores the copy; pruning only zeroes weights, which keeps it so)."""

IN_DTYPE = "_winnow_synflow_dtype"
"""Set on the private copy to the dtype its floating-point state was last converted to."""

FLOAT32_RANGE = (1e-30, 1e30)
"""R must lie in this range for float32 scoring; outside it SynFlow recomputes in float64."""


@register("synflow")
def synflow(
    work: nn.Module,
    params: dict[str, nn.Parameter],
    data: DataSource | None = None,
    input_shape: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
) -> AbsProductScores:
    """SynFlow (Tanaka et al. 2020): ``|θ ⊙ ∂R/∂θ|``, data-free.

    In eval mode, every floating-point tensor of the state_dict (weights, biases, BatchNorm
    affine parameters and running statistics) is replaced by its absolute value; R is the sum
    of the output for an all-ones input of one sample. The data, if given, is used only for
    its input shape.

    The product of many layers overflows float32 on deep networks (ResNet-56 reaches 1e60):
    with ``dtype=None`` the pass runs in float32 while R stays within 1e-30..1e30 and is redone
    in float64 otherwise (and stays in float64 for the later rounds of iterative pruning); the
    scores come in the dtype used. ``ValueError`` if R is not finite even in float64.

    ``channels_last`` (default: on the CPU, for a model with 2-D convolutions) puts the private
    copy in the channels-last memory format, whose single-sample pass oneDNN runs 1.3-1.8x
    faster than the default layout's here (VGG-19, ResNet-20); the scores are the same up to
    float rounding and come in the copy's layout.

    Returns :class:`~winnow.core.selection.AbsProductScores` over θ and ∂R/∂θ: the product is
    formed where the scores are read (selection reads only the weights still alive);
    :func:`winnow.score` returns it formed.
    """
    shape = input_shape_of(data, input_shape)
    if not getattr(work, LINEARISED, False):  # |x| is idempotent: once per private copy
        work.eval()
        with torch.no_grad():
            for tensor in work.state_dict().values():
                if tensor.is_floating_point():
                    tensor.abs_()
        if channels_last is None:
            channels_last = model_device(work).type == "cpu" and any(
                isinstance(m, nn.Conv2d) for m in work.modules()
            )
        if channels_last:
            work.to(memory_format=torch.channels_last)
        setattr(work, LINEARISED, True)
    current = next(iter(params.values())).dtype
    if dtype is not None:
        candidates = [dtype]
    elif current == torch.float64:
        candidates = [torch.float64]
    else:
        candidates = [torch.float32, torch.float64]
    for candidate in candidates:
        if getattr(work, IN_DTYPE, None) != candidate:  # checked once per dtype, not per round
            state = itertools.chain(work.parameters(), work.buffers())
            if any(t.is_floating_point() and t.dtype != candidate for t in state):
                work.to(candidate)
            setattr(work, IN_DTYPE, candidate)
        ones = torch.ones((1, *shape), dtype=candidate, device=model_device(work))
        flow = work(ones).sum()
        value = float(flow.detach())
        in_range = FLOAT32_RANGE[0] < value < FLOAT32_RANGE[1]
        if math.isfinite(value) and (in_range or candidate != torch.float32 or dtype is not None):
            break
    if not math.isfinite(value):
        raise ValueError(f"synflow: R = {value} overflows {candidate}")
    grads = torch.autograd.grad(flow, list(params.values()))
    return AbsProductScores(
        {n: (p.detach(), g) for (n, p), g in zip(params.items(), grads, strict=True)}
    )
