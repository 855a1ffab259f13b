"""Gates in the forward pass through ``torch.nn.utils.parametrize``, on a copy of the model,
and their removal (private plumbing of :mod:`.hard_concrete` and :mod:`.threshold`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from winnow.core.masks import Masks
from winnow.core.modules import split_name
from winnow.core.prunable import prunable_parameters
from winnow.regularizers.penalties import check_group, parameter_names


def attach(
    model: nn.Module, names: Iterable[str] | None, make: Callable[[str, Tensor], nn.Module]
) -> nn.Module:
    """A copy of ``model`` with ``make(name, param)`` registered as a parametrisation of each
    chosen parameter (default: the prunable weights)."""
    chosen = list(prunable_parameters(model, parameter_names(names)))
    gated = copy.deepcopy(model)
    for name in chosen:
        module_name, attr = split_name(name)
        module = gated.get_submodule(module_name)
        param = getattr(module, attr)
        if parametrize.is_parametrized(module, attr):
            raise ValueError(f"{name!r} is already parametrised")
        parametrize.register_parametrization(module, attr, make(name, param))
    return gated


def parametrized(model: nn.Module, kind: type[nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """(plain parameter name, parametrisation) for every ``kind`` parametrisation of ``model``."""
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, chain in module.parametrizations.items():
            for p in chain:
                if isinstance(p, kind):
                    yield (f"{module_name}.{attr}" if module_name else attr), p


def require_gates(model: nn.Module, kind: type[nn.Module], how: str) -> dict[str, nn.Module]:
    found = dict(parametrized(model, kind))
    if not found:
        raise ValueError(f"the model has no {kind.__name__} gates; attach them with {how}")
    return found


def original(model: nn.Module, name: str) -> Tensor:
    module_name, attr = split_name(name)
    return model.get_submodule(module_name).parametrizations[attr].original


def finalize_gates(
    gated: nn.Module,
    kind: type[nn.Module],
    how: str,
    rule: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]],
) -> tuple[nn.Module, Masks]:
    """A plain copy of ``gated`` without its ``kind`` parametrisations: ``rule(p, θ)`` gives
    each parameter's final value and keep-mask from the parametrisation and the original θ."""
    found = require_gates(gated, kind, how)
    plain = copy.deepcopy(gated)
    masks = {}
    with torch.no_grad():
        for name, p in found.items():
            value, keep = rule(p, original(gated, name).detach())
            module_name, attr = split_name(name)
            module = plain.get_submodule(module_name)
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            getattr(module, attr).copy_(value)
            masks[name] = keep.expand_as(value).clone()
    return plain, Masks(masks)


def gate_shape(weight: Tensor, group: str | None) -> tuple[int, ...]:
    if group is None:
        return tuple(weight.shape)
    axis = check_group(group)
    if weight.dim() < 2:
        raise ValueError(f"group {group!r} needs a tensor of at least 2 dimensions")
    return tuple(n if d == axis else 1 for d, n in enumerate(weight.shape))
