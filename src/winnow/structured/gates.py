"""Channel gates: a learnable scalar per output channel (convolution) or neuron (Linear).

A gate multiplies its channel right after the producer's BatchNorm (or after the producer when
no BatchNorm follows it), before the activation, as in Pruning from Scratch (Wang et al. 2020,
"Pruning from Scratch", AAAI): y_c = λ_c · BN(conv(x))_c. With every gate at 1 the gated
network computes exactly what the original does; with gates at 0 and 1 it is the channel-masked
network that :func:`winnow.structured.shrink` turns into a smaller dense one.

Gates are added to a copy of the model by rewriting its ``torch.fx`` graph: the copy is a
``GraphModule`` whose original submodules keep their names (and ``state_dict`` keys), with the
gates under ``channel_gates``. The model given is never changed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, fx, nn

from winnow.structured.dependency import ChannelGroup, analyse


class ChannelGate(nn.Module):
    """``x · λ`` with one learnable ``λ`` per channel (dimension 1), initialised to 1.

    ``group`` is the name of the channel group it gates.
    """

    def __init__(self, channels: int, group: str = "") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, group={self.group!r}"


def _select(
    groups: Sequence[ChannelGroup], names: Iterable[str] | None, include_tied: bool
) -> list[ChannelGroup]:
    if names is None:
        return [g for g in groups if g.prunable and (include_tied or not g.tied)]
    by_name = {p: g for g in groups for p in g.producers}
    chosen: dict[str, ChannelGroup] = {}
    for name in names:
        if name not in by_name:
            raise KeyError(f"no channel group named {name!r}; groups: {[g.name for g in groups]}")
        group = by_name[name]
        if not group.prunable:
            raise ValueError(f"group {group.name!r} cannot be gated: {group.reason}")
        chosen[group.name] = group
    return list(chosen.values())


def add_gates(
    model: nn.Module,
    input_shape: Sequence[int],
    groups: Iterable[str] | None = None,
    include_tied: bool = False,
) -> tuple[fx.GraphModule, list[ChannelGroup]]:
    """A copy of ``model`` with a :class:`ChannelGate` on each chosen channel group.

    By default every prunable group is gated except those tied by a residual addition (in a
    ResNet basic block only the first convolution's channels, as in the authors' code);
    ``include_tied=True`` gates those too, one gate shared by all the layers writing into the
    sum, so their channels stay consistent. ``groups`` names the groups to gate instead. Never
    a model's output (the classifier). Returns the gated copy (in the same train/eval mode)
    and the gated groups, in forward order; :func:`gate_modules` gives the gate modules by group.
    """
    work = copy.deepcopy(model)
    analysis = analyse(work, input_shape)
    chosen = _select(analysis.groups, groups, include_tied)
    graph = analysis.graph
    holder = nn.ModuleDict()
    graph.add_submodule("channel_gates", holder)
    nodes = {n.target: n for n in graph.graph.nodes if n.op == "call_module"}
    param = next(iter(work.parameters()), None)
    for index, group in enumerate(chosen):
        key = f"g{index}"
        gate = ChannelGate(group.size, group.name)
        if param is not None:
            gate.to(device=param.device, dtype=param.dtype)
        holder[key] = gate
        for name in group.gate_after:
            node = nodes[name]
            with graph.graph.inserting_after(node):
                gated = graph.graph.call_module(f"channel_gates.{key}", (node,))
            node.replace_all_uses_with(gated, delete_user_cb=lambda user, g=gated: user is not g)
    graph.graph.lint()
    graph.recompile()
    graph.training = model.training  # the copied submodules keep their own modes
    holder.train(model.training)
    return graph, chosen


def gate_modules(gated: nn.Module) -> dict[str, ChannelGate]:
    """The gates of a model made by :func:`add_gates`, by group name, in forward order."""
    modules = getattr(gated, "channel_gates", None)
    if not isinstance(modules, nn.ModuleDict):
        raise ValueError("the model has no channel gates (see add_gates)")
    return {gate.group: gate for gate in modules.values()}


def gate_values(gated: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every gate's values, by group name."""
    return {name: gate.weight.detach().clone() for name, gate in gate_modules(gated).items()}


@torch.no_grad()
def set_gates(gated: nn.Module, values: Mapping[str, Tensor]) -> None:
    """Copy ``values[group]`` into the gates of the named groups (others keep theirs)."""
    found = gate_modules(gated)
    for name, value in values.items():
        if name not in found:
            raise KeyError(f"no gate for group {name!r}; gated: {list(found)}")
        found[name].weight.copy_(torch.as_tensor(value, dtype=found[name].weight.dtype))


def apply_channel_masks(
    model: nn.Module, masks: Mapping[str, Tensor], input_shape: Sequence[int]
) -> fx.GraphModule:
    """A copy of ``model`` whose masked channels are multiplied by 0 (and the others by 1).

    ``masks`` maps a group name (or any producer of the group) to a boolean tensor of the
    group's size, True for the channels kept. This is the "masked original" that
    :func:`winnow.structured.shrink` reproduces with a smaller network. The gates are frozen
    (``requires_grad=False``).
    """
    gated, chosen = add_gates(model, input_shape, groups=list(masks))
    by_producer = {p: g.name for g in chosen for p in g.producers}
    set_gates(gated, {by_producer[k]: v.to(torch.bool).float() for k, v in masks.items()})
    for gate in gate_modules(gated).values():
        gate.weight.requires_grad_(False)
    return gated
