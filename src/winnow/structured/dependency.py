"""Which channels are coupled: the channel groups of a network, traced with torch.fx.

Removing output channel c of a convolution also removes entry c of the BatchNorm after it and
input channel c of every layer that reads it; a flatten before a Linear maps channel c to the
``H*W`` consecutive input features ``c*H*W ... (c+1)*H*W - 1``; a residual addition ties the
channels of its two operands, so every layer writing into the sum must lose the same channels
(Torch-Pruning's dependency graph, Fang et al. 2023, "DepGraph", makes the same objects first
class). :func:`find_groups` traces a model once and returns those sets as
:class:`ChannelGroup` objects: the layers producing the channels, the BatchNorms normalising
them, and the layers consuming them, with the reason when a group cannot be pruned exactly.

Masking convention (what "a pruned channel" means everywhere in ``winnow.structured``): the
channel is multiplied by 0 right after its producer's BatchNorm (or after the producer itself
when no BatchNorm follows it directly), before the activation; this is where the gates of
Pruning from Scratch sit (Wang et al. 2020). Between that point and the consumers, every
operation must map 0 to 0 channel by channel (ReLU, pooling, dropout, flatten, addition of two
tensors of the same group, ...), so that removing the channel is exact; a group that meets
anything else (a constant added, a sigmoid, a BatchNorm after the activation, a concatenation,
a grouped convolution, the model's input or output) is reported with its reason and left
alone.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from winnow.inputs import zeros_input

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
PRODUCERS = (*CONVS, nn.Linear)

ZERO_PRESERVING_ACTIVATION_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Tanh,
    nn.Softsign,
)
"""Activation modules with f(0) = 0."""
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
ADAPTIVE_POOLS = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
ZERO_PRESERVING_MODULES = (
    *ZERO_PRESERVING_ACTIVATION_MODULES,
    *DROPOUTS,
    nn.Identity,
    *POOLS,
    *ADAPTIVE_POOLS,
)
"""Modules that act on each channel separately and map an all-zero channel to zero."""

_F = nn.functional
FUNCTION_POOLS = frozenset(
    {
        _F.max_pool1d,
        _F.max_pool2d,
        _F.max_pool3d,
        _F.avg_pool1d,
        _F.avg_pool2d,
        _F.avg_pool3d,
        _F.adaptive_avg_pool1d,
        _F.adaptive_avg_pool2d,
        _F.adaptive_avg_pool3d,
        _F.adaptive_max_pool1d,
        _F.adaptive_max_pool2d,
        _F.adaptive_max_pool3d,
    }
)
"""Functional pooling operations: per channel, and an all-zero channel stays zero."""
ZERO_PRESERVING_ACTIVATIONS = frozenset(
    {
        torch.relu,
        torch.tanh,
        _F.relu,
        _F.relu6,
        _F.leaky_relu,
        _F.elu,
        _F.gelu,
        _F.silu,
        _F.mish,
        _F.hardswish,
        _F.hardtanh,
    }
)
"""Functional activations with f(0) = 0, applied elementwise."""
ZERO_PRESERVING_FUNCTIONS = frozenset({*ZERO_PRESERVING_ACTIVATIONS, _F.dropout, *FUNCTION_POOLS})
ZERO_PRESERVING_METHODS = frozenset({"relu", "relu_", "tanh", "contiguous", "clone", "detach"})
REDUCTIONS = frozenset({torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"})
"""Reductions that keep the channel dimension when they reduce only spatial dimensions."""
RESHAPES = frozenset({torch.flatten, torch.reshape, "flatten", "view", "reshape"})
ADDS = frozenset({operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub})
ADD_METHODS = frozenset({"add", "add_", "sub", "sub_"})
MULS = frozenset({operator.mul, operator.imul, torch.mul})
MUL_METHODS = frozenset({"mul", "mul_"})


@dataclass(frozen=True)
class ChannelGroup:
    """A set of channels that must be pruned together.

    ``name`` is the first producer's module name (the key of the group in masks, gates and
    widths). ``size`` is the number of channels. ``producers`` are the convolutions and Linear
    layers whose output channels (features) are these channels; ``norms`` the BatchNorms
    normalising them; ``consumers`` the ``(module, features_per_channel)`` pairs whose input
    channels are these channels (``features_per_channel`` is ``H*W`` for a Linear after a
    flatten, 1 otherwise); ``gate_after`` the modules after whose output a gate or a mask
    multiplies the channels (one per producer: its BatchNorm, or the producer itself).
    ``reason`` says why the group cannot be pruned exactly (None when it can). A group is
    ``tied`` when several producers write into it through a residual addition.
    """

    name: str
    size: int
    producers: tuple[str, ...]
    norms: tuple[str, ...]
    consumers: tuple[tuple[str, int], ...]
    gate_after: tuple[str, ...]
    reason: str | None = None

    @property
    def prunable(self) -> bool:
        return self.reason is None

    @property
    def tied(self) -> bool:
        return len(self.producers) > 1


@dataclass
class Analysis:
    """A traced model: its graph, the per-sample shapes of every node, and its channel groups.

    ``graph`` is a ``torch.fx.GraphModule`` sharing the model's submodules; ``shapes`` maps a
    node name to the output shape at batch 1; ``channels`` maps a node name to
    ``(group name, features per channel)`` for the nodes whose dimension 1 holds the channels of
    a group.
    """

    graph: fx.GraphModule
    groups: list[ChannelGroup]
    shapes: dict[str, tuple[int, ...]]
    channels: dict[str, tuple[str, int]]
    input_shape: tuple[int, ...]

    def group(self, name: str) -> ChannelGroup:
        """The group called ``name``, or the group that module ``name`` produces."""
        for group in self.groups:
            if group.name == name or name in group.producers:
                return group
        raise KeyError(f"no channel group named {name!r}; groups: {[g.name for g in self.groups]}")

    def prunable(self, include_tied: bool = False) -> list[ChannelGroup]:
        """The groups that can be pruned exactly (residual-tied ones only on request)."""
        return [g for g in self.groups if g.prunable and (include_tied or not g.tied)]


@dataclass
class _Space:
    """Channels of one tensor dimension, before residual additions merge spaces."""

    size: int
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


class _Spaces:
    """Union-find over channel spaces."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.spaces: list[_Space] = []

    def new(self, size: int, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.spaces.append(_Space(size, reasons=[reason] if reason else []))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)
        return min(a, b)

    def block(self, i: int, reason: str) -> None:
        self.spaces[i].reasons.append(reason)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, with a ValueError that says what to do on failure."""
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types for untraceable code
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
            "structured pruning needs a forward without data-dependent control flow"
        ) from err


def node_shapes(graph: fx.GraphModule, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Output shape of every tensor-valued node for one input of ``input_shape`` (batch 1).

    Runs the graph once in eval mode under ``torch.no_grad`` on zeros (token ids for a model
    that starts with an embedding, :func:`winnow.inputs.zeros_input`); the train/eval flags of
    every module are restored (BatchNorm statistics are not touched in eval mode).
    """
    shapes: dict[str, tuple[int, ...]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if isinstance(out, Tensor):
                shapes[n.name] = tuple(out.shape)
            return out

    modes = {m: m.training for m in graph.modules()}
    graph.eval()
    try:
        with torch.no_grad():
            Recorder(graph).run(zeros_input(graph, input_shape))
    finally:
        for module, training in modes.items():
            module.training = training
    return shapes


def analyse(model: nn.Module, input_shape: Sequence[int]) -> Analysis:
    """Trace ``model`` and find its channel groups (see :func:`find_groups`)."""
    input_shape = tuple(int(s) for s in input_shape)
    graph = trace(model)
    walk = _Walk(graph, node_shapes(graph, input_shape))
    for node in graph.graph.nodes:
        walk.visit(node)
    groups = _groups(graph, walk.spaces, walk.calls)
    return Analysis(graph, groups, walk.shapes, walk.channels(groups), input_shape)


class _Walk:
    """One pass over a traced graph: which channel space every tensor's dimension 1 belongs
    to (``where``: node -> (space, features per channel)), what reads and writes each space,
    and why a space cannot be pruned."""

    def __init__(self, graph: fx.GraphModule, shapes: dict[str, tuple[int, ...]]) -> None:
        self.graph, self.shapes = graph, shapes
        self.spaces = _Spaces()
        self.where: dict[fx.Node, tuple[int, int]] = {}
        self.calls: dict[str, int] = {}

    def tensors(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), found.append)
        return [a for a in found if a in self.where]

    def block_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in self.tensors(node):
            self.spaces.block(self.where[arg][0], reason)

    def fresh(self, node: fx.Node, reason: str | None = None) -> None:
        shape = self.shapes.get(node.name)
        if shape is not None and len(shape) >= 2:
            self.where[node] = (self.spaces.new(shape[1], reason), 1)

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.fresh(node, "the model's input")
        elif node.op == "get_attr":
            self.fresh(node, f"a constant tensor ({node.target}) is used")
        elif node.op == "output":
            self.block_inputs(node, "the model's output")
        elif node.op == "call_module":
            self.module(node)
        elif self.shapes.get(node.name) is not None:  # not a size, a shape or another value
            self.function(node)

    def _first(self, node: fx.Node) -> fx.Node | None:
        """The node's first argument if it is a tensor whose channels are known."""
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        return first if first is not None and first in self.where else None

    def _produce(self, node: fx.Node, size: int, target: str) -> None:
        self.where[node] = (self.spaces.new(size), 1)
        self.spaces.spaces[self.where[node][0]].producers.append(target)

    def module(self, node: fx.Node) -> None:
        module = self.graph.get_submodule(node.target)
        self.calls[node.target] = self.calls.get(node.target, 0) + 1
        kind, first = type(module), self._first(node)
        spaces, where = self.spaces, self.where
        if kind in CONVS and module.groups == 1 and first is not None:
            space, factor = where[first]
            if factor == 1:
                spaces.spaces[space].consumers.append((node.target, 1))
            else:
                spaces.block(space, f"{node.target} convolves a reshaped tensor")
            self._produce(node, module.out_channels, node.target)
        elif kind is nn.Linear and first is not None and len(self.shapes[first.name]) == 2:
            space, factor = where[first]
            if self.shapes[first.name][1] == spaces.spaces[space].size * factor:
                spaces.spaces[space].consumers.append((node.target, factor))
            else:
                spaces.block(space, f"{node.target} reads a tensor of unexpected size")
            self._produce(node, module.out_features, node.target)
        elif kind in NORMS and first is not None and where[first][1] == 1:
            where[node] = where[first]
            spaces.spaces[where[node][0]].norms.append(node.target)
        elif isinstance(module, ZERO_PRESERVING_MODULES) and first is not None:
            where[node] = where[first]
        elif kind is nn.Flatten and first is not None:
            _flatten(node, first, self.shapes, where, spaces)
        else:
            what = "grouped convolution" if kind in CONVS else f"{kind.__name__}, unsupported"
            self.block_inputs(node, f"{node.target} ({what}) reads it")
            self.fresh(node, f"it comes out of {node.target} ({what})")

    def function(self, node: fx.Node) -> None:
        target, first, inputs = node.target, self._first(node), self.tensors(node)
        if target in RESHAPES and first is not None:
            _flatten(node, first, self.shapes, self.where, self.spaces)
        elif target in ZERO_PRESERVING_FUNCTIONS | ZERO_PRESERVING_METHODS and first is not None:
            self.where[node] = self.where[first]
        elif (
            target in REDUCTIONS
            and first is not None
            and _spatial_reduction(node, self.shapes[first.name])
        ):
            self.where[node] = self.where[first]
        elif target in ADDS | ADD_METHODS | MULS | MUL_METHODS and inputs:
            _binary(node, target, inputs, self.shapes, self.where, self.spaces)
        else:
            label = getattr(target, "__name__", str(target))
            self.block_inputs(node, f"{label} ({node.name}, unsupported) reads it")
            self.fresh(node, f"it comes out of {label} ({node.name})")

    def channels(self, groups: list[ChannelGroup]) -> dict[str, tuple[str, int]]:
        """Node name -> (its channel group, features per channel), for the grouped nodes."""
        names = {producer: group.name for group in groups for producer in group.producers}
        root_name: dict[int, str] = {}
        for node, (space, _) in self.where.items():
            if node.op == "call_module" and node.target in names:
                root_name.setdefault(self.spaces.find(space), names[node.target])
        channels = {}
        for node, (space, factor) in self.where.items():
            name = root_name.get(self.spaces.find(space))
            if name is not None:
                channels[node.name] = (name, factor)
        return channels


def _spatial_reduction(node: fx.Node, before: tuple[int, ...]) -> bool:
    """Whether a mean/sum/amax reduces only dimensions after the channel dimension."""
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dims is None or len(before) < 3:
        return False
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims):
        return False
    return all(d % len(before) >= 2 for d in dims)


def _flatten(node, source, shapes, where, spaces: _Spaces) -> None:
    """Flatten to (N, features): channel c becomes ``prod(spatial)`` consecutive features."""
    before, after = shapes[source.name], shapes[node.name]
    space, factor = where[source]
    if after == before:
        where[node] = where[source]
    elif len(after) == 2 and len(before) >= 2 and after[0] == before[0]:
        where[node] = (space, factor * math.prod(before[2:]))
    else:
        spaces.block(space, f"{node.name} reshapes the channel dimension")
        if len(after) >= 2:
            where[node] = (spaces.new(after[1], f"it comes out of {node.name}"), 1)


def _binary(node, target, inputs, shapes, where, spaces: _Spaces) -> None:
    """Addition ties the channels of its operands; a constant added breaks zero channels."""
    multiply = target in MULS or target in MUL_METHODS
    out = shapes[node.name]
    if len(inputs) == 1:
        space, factor = where[inputs[0]]
        if not multiply:
            spaces.block(space, f"{node.name} adds a constant")
        if shapes[inputs[0].name] == out:
            where[node] = (space, factor)
        else:
            spaces.block(space, f"{node.name} broadcasts")
            if len(out) >= 2:
                where[node] = (spaces.new(out[1], f"it comes out of {node.name}"), 1)
        return
    same_shape = all(shapes[a.name] == out for a in inputs)
    same_factor = len({where[a][1] for a in inputs}) == 1
    if not (same_shape and same_factor):
        for a in inputs:
            spaces.block(where[a][0], f"{node.name} broadcasts")
        if len(out) >= 2:
            where[node] = (spaces.new(out[1], f"it comes out of {node.name}"), 1)
        return
    root = where[inputs[0]][0]
    for a in inputs[1:]:
        root = spaces.union(root, where[a][0])
    where[node] = (root, where[inputs[0]][1])


def _groups(graph: fx.GraphModule, spaces: _Spaces, calls: dict[str, int]) -> list[ChannelGroup]:
    merged: dict[int, _Space] = {}
    for i, space in enumerate(spaces.spaces):
        root = spaces.find(i)
        target = merged.setdefault(root, _Space(spaces.spaces[root].size))
        target.producers += space.producers
        target.norms += space.norms
        target.consumers += space.consumers
        target.reasons += space.reasons
    nodes = {n.target: n for n in graph.graph.nodes if n.op == "call_module"}
    groups = []
    for space in merged.values():
        if not space.producers:
            continue
        producers = list(dict.fromkeys(space.producers))
        gate_after, attached = [], set()
        for producer in producers:
            users = list(nodes[producer].users)
            user = users[0] if len(users) == 1 else None
            is_norm = (
                user is not None
                and user.op == "call_module"
                and type(graph.get_submodule(user.target)) in NORMS
                and user.args[0] is nodes[producer]
            )
            gate_after.append(user.target if is_norm else producer)
            if is_norm:
                attached.add(user.target)
        reasons = list(space.reasons)
        reasons += [
            f"BatchNorm {n} does not directly follow a layer of this group"
            for n in space.norms
            if n not in attached
        ]
        shared = [
            n
            for n in (*space.producers, *space.norms, *(c for c, _ in space.consumers))
            if calls.get(n, 0) > 1
        ]
        reasons += [f"{n} is called more than once" for n in dict.fromkeys(shared)]
        groups.append(
            ChannelGroup(
                name=producers[0],
                size=space.size,
                producers=tuple(producers),
                norms=tuple(dict.fromkeys(space.norms)),
                consumers=tuple(dict.fromkeys(space.consumers)),
                gate_after=tuple(gate_after),
                reason="; ".join(dict.fromkeys(reasons)) or None,
            )
        )
    order = {n.target: i for i, n in enumerate(graph.graph.nodes) if n.op == "call_module"}
    groups.sort(key=lambda g: order[g.name])
    return groups


def find_groups(model: nn.Module, input_shape: Sequence[int]) -> list[ChannelGroup]:
    """The channel groups of ``model`` for inputs of per-sample shape ``input_shape``.

    Traces the model with ``torch.fx`` and runs it once on zeros of batch 1 (eval mode, no
    gradient; the model is not changed) to learn the shapes. Every output channel of a
    convolution (``groups=1``) or output feature of a Linear layer belongs to exactly one
    group; groups come in the order of their first producer in the forward pass. Residual
    additions merge groups (``group.tied``). A group that cannot be pruned exactly has a
    ``reason``; pruning it is refused, so those layers are left alone and the reason is
    reported. Raises ``ValueError`` when the model cannot be traced.
    """
    return analyse(model, input_shape).groups
