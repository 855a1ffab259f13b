"""FLOPs and parameter counts, per layer and in total, for the zoo and any standard network.

What is counted, per sample (the model runs once on a batch of 1):

- **MACs** (multiply-accumulates) of convolutions and Linear layers: a convolution costs
  ``output elements × (in_channels / groups) × kernel elements``, a Linear layer
  ``output elements × in_features``. This is the number the pruning literature calls "FLOPs"
  (Li et al. 2017; Liu et al. 2017; Wang et al. 2020 count VGG-16 on CIFAR-10 as 3.13e8
  FLOPs, which is its MAC count), so :attr:`Counts.flops` is the MAC count, and every FLOPs
  budget in ``winnow.structured`` is a fraction of it.
- **Elementwise operations**, reported apart: a bias adds 1 per output element; BatchNorm 2
  (at inference it is one multiply and one add per element); an activation 1 per element;
  max/average pooling ``kernel elements`` per output element (an adaptive pool or a spatial
  mean: 1 per input element); an addition or multiplication of two tensors 1 per element;
  flatten, reshape, dropout and identity 0.
- **Parameters** of the modules the forward pass uses (each module once, however many times
  it is called); BatchNorm running statistics are buffers, not parameters.

Operations of unknown cost are listed in :attr:`Counts.uncounted`, never silently dropped.
The model is traced with ``torch.fx`` so that functional operations (the residual addition of
a ResNet block) are counted too; a model that cannot be traced is counted with forward hooks
on its leaf modules, and its functional operations are then reported as uncounted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from winnow.inputs import zeros_input
from winnow.structured.dependency import (
    ADAPTIVE_POOLS,
    ADD_METHODS,
    ADDS,
    CONVS,
    DROPOUTS,
    FUNCTION_POOLS,
    MUL_METHODS,
    MULS,
    NORMS,
    POOLS,
    REDUCTIONS,
    RESHAPES,
    ZERO_PRESERVING_ACTIVATION_MODULES,
    ZERO_PRESERVING_ACTIVATIONS,
    Analysis,
    analyse,
)

_F = nn.functional
ACTIVATIONS = (
    *ZERO_PRESERVING_ACTIVATION_MODULES,
    nn.PReLU,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Softplus,
)
FREE = (nn.Identity, nn.Flatten, *DROPOUTS)
FUNCTION_ACTIVATIONS = frozenset(
    {
        *ZERO_PRESERVING_ACTIVATIONS,
        torch.sigmoid,
        _F.sigmoid,
        "relu",
        "relu_",
        "tanh",
        "sigmoid",
    }
)
FUNCTION_FREE = frozenset({_F.dropout, "contiguous", "clone", "detach", *RESHAPES})


@dataclass(frozen=True)
class LayerCount:
    """The cost of one call of a layer or of one functional operation, per sample."""

    name: str
    kind: str
    macs: int
    elementwise: int
    params: int
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class Counts:
    """Per-layer and total counts of a network, per sample (see the module docstring).

    ``layers`` in forward order; ``params`` the parameters of the modules the forward pass
    uses; ``uncounted`` the operations whose cost is unknown.
    """

    layers: tuple[LayerCount, ...]
    params: int
    uncounted: tuple[str, ...] = ()

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the convolutions and Linear layers."""
        return sum(layer.macs for layer in self.layers)

    @property
    def elementwise(self) -> int:
        """Elementwise operations (bias, BatchNorm, activations, pooling, additions)."""
        return sum(layer.elementwise for layer in self.layers)

    @property
    def flops(self) -> int:
        """The pruning literature's FLOPs: the MAC count (Li et al. 2017; Wang et al. 2020)."""
        return self.macs

    def layer_macs(self) -> dict[str, int]:
        """MACs per convolution or Linear layer, by module name."""
        out: dict[str, int] = {}
        for layer in self.layers:
            if layer.macs:
                out[layer.name] = out.get(layer.name, 0) + layer.macs
        return out

    def summary(self) -> str:
        """A text table, one line per layer, then the totals."""
        lines = [f"{'layer':<28} {'kind':<18} {'MACs':>14} {'elementwise':>12} {'params':>10}"]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<28} {layer.kind:<18} {layer.macs:>14,} {layer.elementwise:>12,}"
                f" {layer.params:>10,}"
            )
        lines.append(f"{'total':<47} {self.macs:>14,} {self.elementwise:>12,} {self.params:>10,}")
        if self.uncounted:
            lines.append("uncounted: " + ", ".join(self.uncounted))
        return "\n".join(lines)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def module_cost(
    module: nn.Module, inputs: Sequence[tuple[int, ...]], output: tuple[int, ...]
) -> tuple[int, int, int] | None:
    """``(MACs, elementwise ops, parameters)`` of one call of ``module``, or None if unknown.

    ``inputs`` and ``output`` are the shapes of the call (batch 1); the parameter count
    follows the shapes too, so that a pruned layer can be costed before it exists.
    """
    kind = type(module)
    out = math.prod(output)
    if kind in CONVS:
        cin, cout = inputs[0][1], output[1]
        kernel = math.prod(module.kernel_size)
        bias = module.bias is not None
        weights = cout * (cin // module.groups) * kernel
        return out * (cin // module.groups) * kernel, out if bias else 0, weights + bias * cout
    if kind is nn.Linear:
        fin, fout = inputs[0][-1], output[-1]
        bias = module.bias is not None
        return out * fin, out if bias else 0, fin * fout + bias * fout
    if kind in NORMS:
        return 0, 2 * out, 2 * output[1] if module.affine else 0
    if isinstance(module, POOLS):
        dims = len(output) - 2
        size = module.kernel_size
        kernel = math.prod(size) if isinstance(size, tuple) else size**dims
        return 0, kernel * out, 0
    if isinstance(module, ADAPTIVE_POOLS):
        return 0, math.prod(inputs[0]), 0
    if isinstance(module, ACTIVATIONS):
        return 0, out, _own_params(module)
    if isinstance(module, FREE):
        return 0, 0, 0
    return None


def _function_cost(target, inputs: Sequence[tuple[int, ...]], output: tuple[int, ...]):
    out = math.prod(output)
    if target in ADDS | ADD_METHODS | MULS | MUL_METHODS or target in FUNCTION_ACTIVATIONS:
        return out
    if target in FUNCTION_POOLS or target in REDUCTIONS:
        return math.prod(inputs[0]) if inputs else None
    if target in FUNCTION_FREE:
        return 0
    return None


def _effective(analysis: Analysis, name: str, widths: Mapping[str, int]) -> tuple[int, ...]:
    """The shape of node ``name`` once its group keeps ``widths[group]`` channels."""
    shape = analysis.shapes[name]
    group, factor = analysis.channels.get(name, (None, 1))
    if group in widths:
        return (shape[0], widths[group] * factor, *shape[2:])
    return shape


def count_analysis(analysis: Analysis, widths: Mapping[str, int] | None = None) -> Counts:
    """Counts of a traced model, or of its pruned version with ``widths[group]`` channels kept.

    The pruned count is exact: it equals :func:`count` of the network that
    :func:`winnow.structured.shrink` builds for any masks keeping those numbers of channels
    (a pruned layer's cost depends only on how many channels it keeps).
    """
    widths = dict(widths or {})
    graph = analysis.graph
    layers, uncounted = [], []
    seen: set[str] = set()
    params = sum(p.numel() for p in graph.parameters())
    for node in graph.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if node.name not in analysis.shapes:
            continue
        args: list = []
        torch.fx.node.map_arg((node.args, node.kwargs), args.append)
        inputs = [_effective(analysis, a.name, widths) for a in args if a.name in analysis.shapes]
        output = _effective(analysis, node.name, widths)
        if node.op == "call_module":
            module = graph.get_submodule(node.target)
            cost = module_cost(module, inputs, output)
            if cost is None:
                uncounted.append(f"{node.target} ({type(module).__name__})")
                continue
            macs, elementwise, own = cost
            first = node.target not in seen
            seen.add(node.target)
            if first:
                params += own - _own_params(module)
            layers.append(
                LayerCount(
                    node.target, type(module).__name__, macs, elementwise, own * first, output
                )
            )
        else:
            elementwise = _function_cost(node.target, inputs, output)
            label = getattr(node.target, "__name__", str(node.target))
            if elementwise is None:
                uncounted.append(f"{node.name} ({label})")
                continue
            layers.append(LayerCount(node.name, label, 0, elementwise, 0, output))
    return Counts(tuple(layers), params, tuple(uncounted))


def _count_with_hooks(model: nn.Module, input_shape: Sequence[int]) -> Counts:
    layers: list[LayerCount] = []
    uncounted = ["functional operations (the model cannot be traced by torch.fx)"]
    names = {m: n for n, m in model.named_modules()}
    seen: set[nn.Module] = set()

    def hook(module, args, output):
        if not isinstance(output, torch.Tensor):
            uncounted.append(names[module])
            return
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        cost = module_cost(module, shapes, tuple(output.shape))
        if cost is None:
            uncounted.append(f"{names[module]} ({type(module).__name__})")
            return
        first = module not in seen
        seen.add(module)
        macs, elementwise, own = cost
        layers.append(
            LayerCount(
                names[module],
                type(module).__name__,
                macs,
                elementwise,
                own * first,
                tuple(output.shape),
            )
        )

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(zeros_input(model, input_shape))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    params = sum(p.numel() for p in model.parameters())
    return Counts(tuple(layers), params, tuple(uncounted))


def count(model: nn.Module, input_shape: Sequence[int]) -> Counts:
    """Per-layer and total MACs, elementwise operations and parameters of ``model``.

    ``input_shape`` is the shape of one sample, e.g. ``(1, 28, 28)``. The model runs once on
    zeros of batch 1, in eval mode and without gradients; it is not changed (train/eval flags
    are restored). See the module docstring for what each number counts.
    """
    try:
        analysis = analyse(model, input_shape)
    except ValueError:
        return _count_with_hooks(model, input_shape)
    return count_analysis(analysis)
