"""Module plumbing shared by the later stages: dotted names, submodule replacement, and the
layers a conversion (variational dropout, Bayesian pruning) replaces."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def split_name(name: str) -> tuple[str, str]:
    """``"features.0.weight"`` -> ``("features.0", "weight")``: the owner's dotted name (``""``
    for the root) and the attribute."""
    owner, _, attribute = name.rpartition(".")
    return owner, attribute


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` of ``root`` (a dotted name, as
    ``named_modules`` gives); ``ValueError`` for the empty name (the root itself)."""
    owner, attribute = split_name(name)
    if not attribute:
        raise ValueError("the model itself cannot be replaced; pass a model that contains it")
    setattr(root.get_submodule(owner) if owner else root, attribute, new)


def layer_targets(
    model: nn.Module,
    names: Iterable[str] | None,
    converted: tuple[type, ...],
    skip_last: bool = False,
) -> list[str]:
    """The Linear / Conv2d modules a conversion replaces: ``names`` checked (each must name a
    Linear or Conv2d that is not already one of ``converted``), or by default every module
    whose type is exactly ``nn.Linear`` or ``nn.Conv2d`` (without the last one in module
    order with ``skip_last``: usually the classifier)."""
    modules = dict(model.named_modules())
    if names is None:
        found = [n for n, m in modules.items() if type(m) in (nn.Linear, nn.Conv2d)]
        return found[:-1] if skip_last else found
    if isinstance(names, str):
        raise TypeError("names must be a list of module names, not a single string")
    for name in names:
        if name not in modules:
            raise ValueError(f"model has no module named {name!r}")
        module = modules[name]
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or isinstance(module, converted):
            raise ValueError(
                f"module {name!r} is a {type(module).__name__}, not a Linear or Conv2d"
            )
    return list(names)


@torch.no_grad()
def copy_weight_and_bias(target: nn.Module, source: nn.Module) -> None:
    """``target``'s weight and bias (when ``source`` has one) set to ``source``'s, and its
    training mode."""
    target.weight.copy_(source.weight)
    if source.bias is not None:
        target.bias.copy_(source.bias)
    target.train(source.training)
