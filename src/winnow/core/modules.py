"""Module plumbing shared by the later stages: dotted names and submodule replacement."""

from __future__ import annotations

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
