"""Masks to and from PyTorch's own pruning: ``torch.nn.utils.prune`` and ``torch.ao.pruning``.

- ``torch.nn.utils.prune`` keeps ``weight_orig`` (a parameter), ``weight_mask`` (a buffer) and a
  forward pre-hook that recomputes ``weight`` on every call. :func:`from_torch_prune` turns such
  a model into a plain copy (pruned weights baked in as exact zeros) and :class:`Masks` by the
  plain names; :func:`to_torch_prune` applies masks that way.
- ``torch.ao.pruning`` sparsifiers register a ``FakeSparsity`` parametrisation holding the
  mask. :func:`from_ao` and :func:`to_ao` do the same for them.
- :func:`plain_state_dict`: the state_dict a plain instance of the model's class loads
  strictly, whatever wraps or reparametrises it (``torch.compile``, DDP, FSDP, either pruning
  API).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from winnow.core.masks import Masks
from winnow.core.prunable import unwrap


def _torch_pruned(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, tensor name) of every ``torch.nn.utils.prune`` reparametrisation."""
    found = []
    for module_name, module in model.named_modules():
        for name in list(module._parameters):
            if name.endswith("_orig") and (name[:-5] + "_mask") in module._buffers:
                found.append((module_name, module, name[:-5]))
    return found


def _copy_torch_pruned(model: nn.Module) -> nn.Module:
    """A deep copy of a model pruned with ``torch.nn.utils.prune`` (its recomputed weights are
    not graph leaves, which ``copy.deepcopy`` refuses: they are set aside while copying)."""
    stashed = []
    for _, module, name in _torch_pruned(model):
        if name in module.__dict__:
            stashed.append((module, name, module.__dict__.pop(name)))
    try:
        return copy.deepcopy(model)
    finally:
        for module, name, value in stashed:
            module.__dict__[name] = value


def from_torch_prune(model: nn.Module) -> tuple[nn.Module, Masks]:
    """A plain copy of a model pruned with ``torch.nn.utils.prune`` (``weight`` = ``weight_orig``
    ⊙ ``weight_mask`` as a parameter again, the hooks removed) and its masks, by the plain
    parameter names. ``model`` is not changed."""
    import torch.nn.utils.prune as torch_prune

    plain = _copy_torch_pruned(unwrap(model))
    masks = {}
    for module_name, module, name in _torch_pruned(plain):
        full = f"{module_name}.{name}" if module_name else name
        masks[full] = module._buffers[name + "_mask"].detach().to(torch.bool).clone()
        torch_prune.remove(module, name)
    if not masks:
        raise ValueError(f"{type(model).__name__} carries no torch.nn.utils.prune masks")
    return plain, Masks(masks)


def to_torch_prune(model: nn.Module, masks: Masks) -> nn.Module:
    """Apply ``masks`` to ``model`` in place the ``torch.nn.utils.prune`` way
    (``custom_from_mask``: ``weight_orig``, ``weight_mask`` and a forward pre-hook); returns it."""
    import torch.nn.utils.prune as torch_prune

    target = unwrap(model)
    masks.check_model(target)
    for name, mask in masks.items():
        owner, _, attr = name.rpartition(".")
        module = target.get_submodule(owner) if owner else target
        torch_prune.custom_from_mask(module, attr, mask.to(getattr(module, attr).device))
    return model


def _ao_sparsity(module: nn.Module, name: str) -> Tensor | None:
    chain = module.parametrizations[name] if parametrize.is_parametrized(module, name) else []
    for p in chain:
        if type(p).__name__ == "FakeSparsity" and isinstance(getattr(p, "mask", None), Tensor):
            return p.mask
    return None


def from_ao(model: nn.Module) -> tuple[nn.Module, Masks]:
    """A plain copy of a model with ``torch.ao.pruning`` ``FakeSparsity`` parametrisations
    (the masked weights baked in, the parametrisations removed) and its masks, by the plain
    names. ``model`` is not changed."""
    plain = copy.deepcopy(unwrap(model))
    masks = {}
    for module_name, module in plain.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations):
            mask = _ao_sparsity(module, name)
            if mask is None:
                continue
            full = f"{module_name}.{name}" if module_name else name
            masks[full] = mask.detach().to(torch.bool).clone()
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    if not masks:
        raise ValueError(f"{type(model).__name__} carries no torch.ao.pruning parametrisations")
    return plain, Masks(masks)


def to_ao(model: nn.Module, masks: Masks) -> nn.Module:
    """Register a ``torch.ao.pruning`` ``FakeSparsity`` parametrisation holding each mask on
    ``model``, in place (what an ao sparsifier's ``prepare`` does); returns it."""
    from torch.ao.pruning.sparsifier.utils import FakeSparsity

    target = unwrap(model)
    masks.check_model(target)
    for name, mask in masks.items():
        owner, _, attr = name.rpartition(".")
        module = target.get_submodule(owner) if owner else target
        keep = mask.to(device=getattr(module, attr).device, dtype=getattr(module, attr).dtype)
        parametrize.register_parametrization(module, attr, FakeSparsity(keep))
    return model


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` as a plain instance of its class: unwrapped (``torch.compile``, DDP,
    FSDP) and with ``torch.nn.utils.prune`` or ``torch.ao.pruning`` masks baked into the
    weights. ``model`` is not changed."""
    model = unwrap(model)
    if _torch_pruned(model):
        model = from_torch_prune(model)[0]
    if any(
        _ao_sparsity(m, n) is not None
        for m in model.modules()
        if parametrize.is_parametrized(m)
        for n in m.parametrizations
    ):
        return from_ao(model)[0]
    return copy.deepcopy(model)


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict a plain instance of ``model``'s class loads strictly: unwrapped
    (``torch.compile``, DDP, FSDP: no ``_orig_mod.`` or ``module.`` prefixes) and with
    ``torch.nn.utils.prune`` or ``torch.ao.pruning`` masks baked into the weights."""
    inner = unwrap(model)
    reparametrised = _torch_pruned(inner) or any(
        parametrize.is_parametrized(m) for m in inner.modules()
    )
    return dict((plain_copy(inner) if reparametrised else inner).state_dict())
