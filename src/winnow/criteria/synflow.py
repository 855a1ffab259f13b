"""SynFlow: Iterative Synaptic Flow Pruning (Tanaka, Kunin, Yamins & Ganguli 2020, NeurIPS)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from winnow.core.scores import AbsProductScores
from winnow.criteria.registry import register
from winnow.criteria.sampling import DataSource, model_device
from winnow.inputs import call, example_input, logits_of, takes_token_ids, zeros_input


@dataclass(frozen=True)
class SynFlowOptions:
    """``input_shape``: one sample's shape (else read from the data); ``dtype``: float32 or
    float64 (default: float32, redone in float64 when R leaves float32's range);
    ``channels_last``: score a channels-last copy (default: on the CPU, for 2-D convolutions)."""

    input_shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
                raise ValueError(f"SynFlowOptions.input_shape must be positive ints, got {shape}")
            object.__setattr__(self, "input_shape", shape)
        if self.dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"SynFlowOptions.dtype must be float32 or float64, got {self.dtype}")


@dataclass
class SynFlowState:
    """What SynFlow keeps between the rounds it scores one private copy: whether the copy is
    linearised (absolute state, eval mode, maybe channels-last: pruning only zeroes weights,
    which keeps it so) and the dtype its floating-point state was last converted to."""

    linearised: bool = False
    dtype: torch.dtype | None = None


FLOAT32_RANGE = (1e-30, 1e30)
"""R must lie in this range for float32 scoring; outside it SynFlow recomputes in float64."""


@register("synflow", SynFlowOptions, state=SynFlowState)
def synflow(
    work: nn.Module,
    params: dict[str, nn.Parameter],
    data: DataSource | None,
    options: SynFlowOptions,
    state: SynFlowState,
) -> AbsProductScores:
    """SynFlow (Tanaka et al. 2020): ``|θ ⊙ ∂R/∂θ|``, data-free.

    In eval mode, every floating-point tensor of the state_dict (weights, biases, BatchNorm
    affine parameters and running statistics) is replaced by its absolute value; R is the sum
    of the output (its logits, for a model that returns more) for an all-ones input of one
    sample. The data, if given, is used only for the form of one example (its floating inputs
    become ones; token ids are kept).

    A model that takes token ids through an ``nn.Embedding`` has no all-ones input; winnow's
    definition is the one of an all-ones one-hot input: each embedding's output is the sum of
    all its (absolute) rows at every position, so every row's weights receive the flow. Give
    the data or ``input_shape=(sequence length,)`` (then the ids are zeros, which the
    embeddings ignore).

    The product of many layers overflows float32 on deep networks (ResNet-56 reaches 1e60):
    with ``dtype=None`` the pass runs in float32 while R stays within 1e-30..1e30 and is redone
    in float64 otherwise (and stays in float64 for the later rounds of iterative pruning); the
    scores come in the dtype used. ``ValueError`` if R is not finite even in float64.

    ``channels_last`` (default: on the CPU, for a model with 2-D convolutions) puts the private
    copy in the channels-last memory format, whose single-sample pass oneDNN runs 1.3-1.8x
    faster than the default layout's here (VGG-19, ResNet-20); the scores are the same up to
    float rounding and come in the copy's layout.

    Returns :class:`~winnow.core.scores.AbsProductScores` over θ and ∂R/∂θ: the product is
    formed where the scores are read (selection reads only the weights still alive);
    :func:`winnow.score` returns it formed.
    """
    dtype, channels_last = options.dtype, options.channels_last
    embeddings = [m for m in work.modules() if isinstance(m, nn.Embedding)]
    if not state.linearised:  # |x| is idempotent: once per private copy
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
        state.linearised = True
    current = next(iter(params.values())).dtype
    if dtype is not None:
        candidates = [dtype]
    elif current == torch.float64:
        candidates = [torch.float64]
    else:
        candidates = [torch.float32, torch.float64]
    for candidate in candidates:
        if state.dtype != candidate:  # checked once per dtype, not per round
            tensors = itertools.chain(work.parameters(), work.buffers())
            if any(t.is_floating_point() and t.dtype != candidate for t in tensors):
                work.to(candidate)
            state.dtype = candidate
        ones = _example(work, data, options.input_shape, candidate)
        handles = [m.register_forward_hook(_all_rows) for m in embeddings]
        try:
            flow = logits_of(call(work, (ones,))).sum()
        finally:
            for handle in handles:
                handle.remove()
        value = float(flow.detach())
        in_range = FLOAT32_RANGE[0] < value < FLOAT32_RANGE[1]
        if math.isfinite(value) and (in_range or candidate != torch.float32 or dtype is not None):
            break
    if math.isnan(value):
        raise ValueError("synflow: R is NaN: a weight or a statistic of the network is NaN")
    if not math.isfinite(value):
        raise ValueError(f"synflow: R = {value} overflows {candidate}")
    grads = torch.autograd.grad(flow, list(params.values()))
    return AbsProductScores(
        {n: (p.detach(), g) for (n, p), g in zip(params.items(), grads, strict=True)}
    )


def _example(model, data, input_shape, dtype):
    """One all-ones example; token ids (zeros) for a model that takes them given a shape."""
    if input_shape is not None and data is None and takes_token_ids(model):
        return zeros_input(model, input_shape)
    return example_input(data, input_shape, model_device(model), dtype)


def _all_rows(module: nn.Embedding, inputs, output: Tensor) -> Tensor:
    """An embedding's output for an all-ones one-hot input: the sum of its rows, everywhere."""
    return module.weight.sum(0).expand_as(output)
