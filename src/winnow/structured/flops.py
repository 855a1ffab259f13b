"""FLOPs and parameter counts, per layer and in total, for the zoo and any network.

What is counted, per sample (the model runs once on a batch of 1, token ids 0 for a model that
starts with an embedding, :func:`winnow.inputs.zeros_input`):

- **MACs** (multiply-accumulates). This is the number the pruning literature calls "FLOPs"
  (Li et al. 2017; Liu et al. 2017; Wang et al. 2020 count VGG-16 on CIFAR-10 as 3.13e8
  FLOPs, which is its MAC count), so :attr:`Counts.flops` is the MAC count, and every FLOPs
  budget in ``winnow.structured`` is a fraction of it. Two engines count them:

  - *hand formulas* (``engine="formula"``), from shapes: a convolution costs
    ``output elements × (in_channels / groups) × kernel elements``, a Linear layer (and a
    Hugging Face ``Conv1D``) ``output elements × in_features``; an ``nn.LSTM`` / ``nn.GRU`` /
    ``nn.RNN`` ``gates × hidden × (layer input + state)`` per time step, direction and layer
    (4, 3 and 1 gates; the state is ``hidden``, or an LSTM's ``proj_size``, whose projection
    adds ``proj_size × hidden``), the cells likewise for one step; an embedding 0 (a lookup).
  - ``torch.utils.flop_counter.FlopCounterMode`` (``engine="FlopCounterMode"``) for every
    other module and function: attention (``nn.MultiheadAttention``, transformer layers,
    ``F.scaled_dot_product_attention``, ``torch.matmul``, ...), transposed convolutions,
    Hugging Face blocks. It counts FLOPs = 2 × MACs of matrix products, convolutions and
    attention; they are halved. Formulas are added for the CPU kernels it does not know
    (``mkldnn_rnn_layer``, the CPU flash attention, ``mv``, ``addmv``, ``dot``), and the fused
    "fast path" of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` is switched off
    while counting, so that attention is seen as its projections, ``QKᵀ`` and ``AV``.

- **Elementwise operations**, reported apart, from the hand formulas: a bias adds 1 per output
  element; BatchNorm 2 (at inference it is one multiply and one add per element); an
  activation 1 per element; max/average pooling ``kernel elements`` per output element (an
  adaptive pool or a spatial mean: 1 per input element); an addition or multiplication of two
  tensors 1 per element; flatten, reshape, concatenation, indexing, dropout and identity 0; a
  recurrent layer, per step, direction and layer, ``gates × hidden`` to add its two products,
  ``2 × gates × hidden`` for the biases and ``9 × hidden`` (LSTM), ``8 × hidden`` (GRU) or
  ``hidden`` (RNN) for the gate activations and the state update. A layer counted by
  FlopCounterMode has 0 elementwise operations in its :class:`LayerCount` (FlopCounterMode
  counts only products): its softmax, normalisations and additions are not counted.
- **Parameters** of the modules the forward pass uses (each module once, however many times
  it is called); BatchNorm running statistics are buffers, not parameters.

Nothing is skipped silently: :attr:`Counts.uncounted` names every module or operation that
computes something neither engine counts: one without a formula whose operations have no
FlopCounterMode count (a softmax, a LayerNorm, a module's own additions), with the aten
operations it ran, and any matrix product, convolution, recurrent or attention kernel that
FlopCounterMode has no formula for (its MACs are missing from the total; the entry says so).

The model is traced with ``torch.fx`` so that functional operations (the residual addition of
a ResNet block) get their elementwise formulas; when some operation has no formula (or returns
no tensor), the graph runs once more under FlopCounterMode, and a module without a formula is
counted module by module inside it (an ``nn.TransformerEncoder`` layer by layer: its Linear
layers by formula, its attention by FlopCounterMode). A model that cannot be traced
(data-dependent control flow, Hugging Face models) runs once under FlopCounterMode with hooks
on all its modules: modules with a formula are counted by it, the others by FlopCounterMode,
and the products a module computes in its own ``forward`` (outside its submodules) appear as a
layer of kind ``"<Module> (functional)"``.

:func:`count_analysis` costs a traced model from its shapes alone (the pruned widths of
``winnow.structured``): hand formulas only, everything else named in ``uncounted``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

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
FUNCTION_FREE = frozenset(
    {
        _F.dropout,
        "contiguous",
        "clone",
        "detach",
        *RESHAPES,
        operator.getitem,
        torch.cat,
        torch.concat,
        torch.stack,
        torch.permute,
        torch.transpose,
        torch.squeeze,
        torch.unsqueeze,
        torch.chunk,
        torch.split,
        "permute",
        "transpose",
        "squeeze",
        "unsqueeze",
        "expand",
        "expand_as",
        "view_as",
        "reshape_as",
        "chunk",
        "split",
        "unbind",
    }
)
"""Functions and methods that only move, copy or index data (0 operations)."""
RECURRENT = (nn.RNNBase, nn.RNNCellBase)
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_STATE_UPDATE = {"LSTM": 9, "GRU": 8, "RNN_TANH": 1, "RNN_RELU": 1}
"""Elementwise operations per hidden unit for the gate activations and the state update."""
FORMULA = "formula"
MEASURED = "FlopCounterMode"


@dataclass(frozen=True)
class LayerCount:
    """The cost of one call of a layer or of one functional operation, per sample.

    ``engine``: ``"formula"`` (a hand formula) or ``"FlopCounterMode"`` (MACs measured by
    ``torch.utils.flop_counter``; elementwise operations not counted).
    """

    name: str
    kind: str
    macs: int
    elementwise: int
    params: int
    output_shape: tuple[int, ...]
    engine: str = FORMULA


@dataclass(frozen=True)
class Counts:
    """Per-layer and total counts of a network, per sample (see the module docstring).

    ``layers`` in forward order; ``params`` the parameters of the modules the forward pass
    uses; ``uncounted`` the modules and operations that compute something neither engine
    counts (each with what it ran), and the kernels whose MACs are missing.
    """

    layers: tuple[LayerCount, ...]
    params: int
    uncounted: tuple[str, ...] = ()

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the convolutions, Linear, recurrent and attention layers."""
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
        """MACs per layer with any, by module (or operation) name."""
        out: dict[str, int] = {}
        for layer in self.layers:
            if layer.macs:
                out[layer.name] = out.get(layer.name, 0) + layer.macs
        return out

    def summary(self) -> str:
        """A text table, one line per layer, then the totals (``*``: by FlopCounterMode)."""
        lines = [f"{'layer':<28} {'kind':<18} {'MACs':>14} {'elementwise':>12} {'params':>10}"]
        for layer in self.layers:
            mark = " *" if layer.engine == MEASURED else ""
            lines.append(
                f"{layer.name:<28} {layer.kind:<18} {layer.macs:>14,} {layer.elementwise:>12,}"
                f" {layer.params:>10,}{mark}"
            )
        lines.append(f"{'total':<47} {self.macs:>14,} {self.elementwise:>12,} {self.params:>10,}")
        if any(layer.engine == MEASURED for layer in self.layers):
            lines.append("* MACs by FlopCounterMode, elementwise operations not counted")
        if self.uncounted:
            lines.append("uncounted: " + ", ".join(self.uncounted))
        return "\n".join(lines)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _recurrent_cost(module: nn.Module, x: tuple[int, ...]) -> tuple[int, int, int]:
    """``(MACs, elementwise ops, parameters)`` of an RNN/LSTM/GRU layer or cell on input ``x``."""
    if isinstance(module, nn.RNNBase):
        mode, layers = module.mode, module.num_layers
        directions = 2 if module.bidirectional else 1
        projection = module.proj_size if isinstance(module, nn.LSTM) else 0
    else:  # a cell: one step, one layer, one direction
        mode = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}.get(type(module), "RNN_TANH")
        layers, directions, projection = 1, 1, 0
    gates, hidden = _GATES[mode], module.hidden_size
    state = projection or hidden
    steps = math.prod(x[:-1])  # time steps × batch (1), or the batch (1) of a cell
    macs = elementwise = 0
    for layer in range(layers):
        width = module.input_size if layer == 0 else directions * state
        macs += directions * (gates * hidden * (width + state) + projection * hidden)
        bias = 2 * gates * hidden if module.bias else 0
        elementwise += directions * (gates * hidden + bias + _STATE_UPDATE[mode] * hidden)
    return steps * macs, steps * elementwise, _own_params(module)


def module_cost(
    module: nn.Module, inputs: Sequence[tuple[int, ...]], output: tuple[int, ...]
) -> tuple[int, int, int] | None:
    """``(MACs, elementwise ops, parameters)`` of one call of ``module``, or None if unknown.

    ``inputs`` and ``output`` are the shapes of the call (batch 1; the first tensor of a tuple
    output); the parameter count follows the shapes too, so that a pruned layer can be costed
    before it exists.
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
    if isinstance(module, RECURRENT) and inputs:
        return _recurrent_cost(module, inputs[0])
    if isinstance(module, nn.Embedding):
        return 0, 0, _own_params(module)
    if kind.__name__ == "Conv1D" and hasattr(module, "nf") and inputs:  # Hugging Face GPT-2
        fin, fout = inputs[0][-1], output[-1]
        return out * fin, out, fin * fout + fout
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


# --- FlopCounterMode ---------------------------------------------------------------------------

_aten = torch.ops.aten


def _mv_flop(matrix, vector, *args, out_shape=None, **kwargs) -> int:
    return 2 * matrix[0] * matrix[1]


def _addmv_flop(bias, matrix, vector, *args, out_shape=None, **kwargs) -> int:
    return 2 * matrix[0] * matrix[1]


def _dot_flop(a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0]


def _addmm_activation_flop(bias, a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1] * b[1]


def _attention_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """``QKᵀ`` and ``AV``: query ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``."""
    batch, length, depth = math.prod(query[:-2]), query[-2], query[-1]
    return 2 * batch * length * key[-2] * (depth + value[-1])


def _mkldnn_rnn_layer_flop(x, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    """One layer and direction of a recurrent network on CPU: both products at every step."""
    return 2 * math.prod(x[:-1]) * (math.prod(w_ih) + math.prod(w_hh))


EXTRA_FORMULAS = {
    getattr(_aten, name): formula
    for name, formula in (
        ("mv", _mv_flop),
        ("addmv", _addmv_flop),
        ("dot", _dot_flop),
        ("vdot", _dot_flop),
        ("_addmm_activation", _addmm_activation_flop),
        ("_scaled_dot_product_flash_attention_for_cpu", _attention_flop),
        ("mkldnn_rnn_layer", _mkldnn_rnn_layer_flop),
    )
    if hasattr(_aten, name)
}
"""FlopCounterMode formulas (FLOPs, 2 per MAC) for the kernels it does not count itself."""

_PRODUCT_WORDS = frozenset(
    {
        "mm",
        "bmm",
        "addmm",
        "addbmm",
        "baddbmm",
        "mv",
        "addmv",
        "dot",
        "vdot",
        "inner",
        "outer",
        "addr",
        "ger",
        "matmul",
        "einsum",
        "tensordot",
        "linear",
        "bilinear",
        "trilinear",
        "cdist",
        "rnn",
        "lstm",
        "gru",
        "attention",
        "transformer",
        "convolution",
    }
)
_FREE_OPS = frozenset(
    {
        "clone",
        "_to_copy",
        "copy",
        "copy_",
        "detach",
        "alias",
        "cat",
        "stack",
        "embedding",
        "index_select",
        "gather",
        "index",
        "zeros",
        "ones",
        "empty",
        "full",
        "arange",
        "zeros_like",
        "ones_like",
        "empty_like",
        "full_like",
        "new_zeros",
        "new_ones",
        "new_empty",
        "new_full",
        "new_empty_strided",
        "empty_strided",
        "scalar_tensor",
        "lift_fresh",
        "lift_fresh_copy",
        "_local_scalar_dense",
        "is_nonzero",
        "item",
        "fill",
        "fill_",
        "zero_",
        "repeat",
        "_unsafe_view",
        "constant_pad_nd",
        "slice_scatter",
        "select_scatter",
        "contiguous",
    }
)
"""aten operations that only allocate, copy, look up or rearrange data."""


def _multiplies(op: str) -> bool:
    """Whether the aten operation ``op`` (e.g. ``"aten.mm"``) is a matrix product, convolution,
    recurrent or attention kernel."""
    words = op.rsplit(".", 1)[-1].split("_")
    return any(
        w in _PRODUCT_WORDS or (w.startswith("conv") and not w.startswith("convert")) for w in words
    )


def _free(func) -> bool:
    """Whether an aten operation computes nothing (a view, a copy, an allocation, a lookup)."""
    returns = func._schema.returns
    if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return True
    return str(func._overloadpacket).rsplit(".", 1)[-1] in _FREE_OPS


def _shape(value: Any) -> tuple[int, ...] | None:
    """The shape of the first tensor in ``value`` (a tensor, tuple, list, dict or HF output)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    items = value.values() if isinstance(value, Mapping) else value
    if isinstance(items, (tuple, list)) or isinstance(value, Mapping):
        for item in items:
            found = _shape(item)
            if found is not None:
                return found
    return None


@dataclass(eq=False)
class _Call:
    """One call of a module under the meter: its FlopCounterMode FLOPs (children included), the
    calls of its submodules, and the aten operations it ran itself (outside its submodules)
    that FlopCounterMode does not count: products without a formula, other computations."""

    name: str
    module: nn.Module
    inputs: list[tuple[int, ...]]
    start: int
    output: tuple[int, ...] | None = None
    flops: int = 0
    children: list[_Call] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)


class _Meter(TorchDispatchMode):
    """Runs under FlopCounterMode (entered after it, so it sees the operations FlopCounterMode
    executes) and records module calls and the operations FlopCounterMode does not count."""

    def __init__(self, names: Mapping[nn.Module, str]) -> None:
        super().__init__()
        self.counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
        self.known = {*flop_registry, *EXTRA_FORMULAS}
        self.names = names
        self.stack: list[_Call] = []
        self.calls: list[_Call] = []  # outermost calls, in order
        self.unknown: list[str] = []  # operations outside any module call
        self.ops: list[str] = []

    def total(self) -> int:
        return self.counter.get_total_flops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        if packet not in self.known:
            op = str(packet)
            where = self.stack[-1] if self.stack else self
            if _multiplies(op):
                where.unknown.append(op)
            elif not _free(func):
                where.ops.append(op)
        return func(*args, **(kwargs or {}))

    def enter(self, module: nn.Module, args, kwargs) -> None:
        shapes = [tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        call = _Call(self.names[module], module, shapes, self.total())
        (self.stack[-1].children if self.stack else self.calls).append(call)
        self.stack.append(call)

    def leave(self, module: nn.Module, args, kwargs, output) -> None:
        while self.stack:  # a call left by an exception inside a module is closed here
            call = self.stack.pop()
            call.flops = self.total() - call.start
            if call.module is module:
                call.output = _shape(output)
                return


@contextmanager
def _metered(model: nn.Module) -> Iterator[_Meter]:
    """``model`` in eval mode, without gradients, without the fused attention fast path, with a
    meter watching every module call; modes and the fast-path flag are restored after."""
    names = {module: name for name, module in model.named_modules()}
    meter = _Meter(names)
    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(meter.enter, with_kwargs=True))
        handles.append(module.register_forward_hook(meter.leave, with_kwargs=True))
    modes = {m: m.training for m in model.modules()}
    fast_path = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), meter, meter.counter:
            yield meter
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


def _listing(ops: Sequence[str]) -> str:
    return ", ".join(sorted(set(ops)))


class _Tally:
    """Layers and uncounted entries, built from hand formulas and measured calls."""

    def __init__(self) -> None:
        self.layers: list[LayerCount] = []
        self.uncounted: list[str] = []
        self.seen: set[nn.Module] = set()

    def first(self, module: nn.Module) -> bool:
        first = module not in self.seen
        self.seen.add(module)
        return first

    def call(self, call: _Call) -> None:
        """One module call: its formula, or FlopCounterMode's count of it as a whole when none
        of its submodules ran, else its submodules one by one and its own operations."""
        module, name = call.module, call.name or "(model)"
        kind = type(module).__name__
        cost = None
        if call.output is not None or isinstance(module, RECURRENT):
            try:
                cost = module_cost(module, call.inputs, call.output or ())
            except (IndexError, TypeError, ZeroDivisionError):
                cost = None  # called in a way the formula does not know: measure it
        if cost is not None:
            macs, elementwise, own = cost
            shape = call.output or ()
            layer = LayerCount(name, kind, macs, elementwise, own * self.first(module), shape)
            self.layers.append(layer)
            return
        if not call.children:
            self.measured(name, kind, call, call.flops, _own_params(module), unit=True)
            return
        for child in call.children:
            self.call(child)
        own = call.flops - sum(child.flops for child in call.children)
        direct = sum(p.numel() for p in module.parameters(recurse=False))
        self.measured(name, kind, call, own, direct, unit=False)

    def measured(self, name: str, kind: str, call, flops: int, params: int, unit: bool) -> None:
        """A module or function as a whole (``unit``), or a module's own operations (outside its
        submodules), by FlopCounterMode."""
        output = call.output or ()
        if call.unknown:
            self.uncounted.append(
                f"{name} ({kind}): {_listing(call.unknown)} without a FLOP formula, "
                "MACs not counted"
            )
        if flops or (unit and not call.ops and not call.unknown):
            first = self.first(call.module) if isinstance(call, _Call) else False
            label = kind if unit else f"{kind} (functional)"
            self.layers.append(
                LayerCount(name, label, flops // 2, 0, params * first, output, MEASURED)
            )
        elif call.ops and not call.unknown:
            ops = _listing(call.ops)
            own = f": functional operations {ops}"
            self.uncounted.append(f"{name} ({kind}: {ops})" if unit else f"{name} ({kind}){own}")


@dataclass
class _Run:
    """One node of a traced graph run under the meter."""

    flops: int
    calls: list[_Call]
    unknown: list[str]
    ops: list[str]
    output: tuple[int, ...] | None


def _measure(analysis: Analysis) -> dict[str, _Run]:
    """Every node of ``analysis.graph`` run once under FlopCounterMode, by node name."""
    graph, runs = analysis.graph, {}
    with _metered(graph) as meter:

        class Runner(fx.Interpreter):
            def run_node(self, n: fx.Node):
                flops, calls = meter.total(), len(meter.calls)
                unknown, ops = len(meter.unknown), len(meter.ops)
                out = super().run_node(n)
                runs[n.name] = _Run(
                    meter.total() - flops,
                    meter.calls[calls:],
                    meter.unknown[unknown:],
                    meter.ops[ops:],
                    _shape(out),
                )
                return out

        Runner(graph).run(zeros_input(graph, analysis.input_shape))
    return runs


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
    (a pruned layer's cost depends only on how many channels it keeps). Only the hand
    formulas are used (from shapes, without running the model): a module or operation without
    one is named in ``uncounted`` (:func:`count` measures those with FlopCounterMode).
    """
    return _count_traced(analysis, widths, None)


def _count_traced(
    analysis: Analysis, widths: Mapping[str, int] | None, runs: Mapping[str, _Run] | None
) -> Counts:
    widths = dict(widths or {})
    graph = analysis.graph
    tally = _Tally()
    layers, uncounted = tally.layers, tally.uncounted
    seen: set[str] = set()
    params = sum(p.numel() for p in graph.parameters())
    for node in graph.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        run = runs.get(node.name) if runs is not None else None
        tensor = node.name in analysis.shapes
        args: list = []
        torch.fx.node.map_arg((node.args, node.kwargs), args.append)
        inputs = [_effective(analysis, a.name, widths) for a in args if a.name in analysis.shapes]
        output = _effective(analysis, node.name, widths) if tensor else None
        if output is None and run is not None:
            output = run.output
        if node.op == "call_module":
            module = graph.get_submodule(node.target)
            cost = None
            if output is not None or isinstance(module, RECURRENT):
                cost = module_cost(module, inputs, output or ())
            if cost is None:
                calls = [c for c in run.calls if c.module is module] if run is not None else []
                if calls:
                    for call in calls:
                        tally.call(call)
                else:
                    uncounted.append(f"{node.target} ({type(module).__name__})")
                continue
            macs, elementwise, own = cost
            first = node.target not in seen
            seen.add(node.target)
            tally.seen.add(module)
            if first:
                params += own - _own_params(module)
            layers.append(
                LayerCount(
                    node.target, type(module).__name__, macs, elementwise, own * first, output or ()
                )
            )
        else:
            elementwise = _function_cost(node.target, inputs, output) if tensor else None
            label = getattr(node.target, "__name__", str(node.target))
            if elementwise is not None:
                layers.append(LayerCount(node.name, label, 0, elementwise, 0, output))
            elif run is not None:
                if tensor or run.flops or run.unknown or run.ops:
                    tally.measured(node.name, label, run, run.flops, 0, unit=True)
            elif tensor:
                uncounted.append(f"{node.name} ({label})")
    return Counts(tuple(layers), params, tuple(uncounted))


def _count_with_hooks(model: nn.Module, input_shape: Sequence[int]) -> Counts:
    with _metered(model) as meter:
        model(zeros_input(model, input_shape))
    tally = _Tally()
    for call in meter.calls:
        tally.call(call)
    if meter.unknown or meter.ops:  # outside every module call (not expected)
        outside = _Run(0, [], meter.unknown, meter.ops, None)
        tally.measured("(outside modules)", type(model).__name__, outside, 0, 0, unit=False)
    params = sum(p.numel() for p in model.parameters())
    return Counts(tuple(tally.layers), params, tuple(tally.uncounted))


def count(model: nn.Module, input_shape: Sequence[int]) -> Counts:
    """Per-layer and total MACs, elementwise operations and parameters of ``model``.

    ``input_shape`` is the shape of one sample, e.g. ``(1, 28, 28)``, or ``(length,)`` of
    token ids for a model that starts with an embedding. The model runs on zeros of batch 1,
    in eval mode and without gradients; it is not changed (train/eval flags are restored).
    It may return a tensor, a tuple or an output object. See the module docstring for what
    each number counts and by which engine.
    """
    try:
        analysis = analyse(model, input_shape)
    except ValueError:
        return _count_with_hooks(model, input_shape)
    counts = _count_traced(analysis, None, None)
    computed = ("call_module", "call_function", "call_method")
    nodes = [n for n in analysis.graph.graph.nodes if n.op in computed]
    if not counts.uncounted and all(n.name in analysis.shapes for n in nodes):
        return counts  # every operation has a formula: measuring would change nothing
    return _count_traced(analysis, None, _measure(analysis))
