"""A training run's whole state in one checksummed file, so a killed run resumes bit-identically.

:func:`winnow.train` with ``checkpoint=PATH`` writes, after each evaluation, everything the
next steps depend on: the model's ``state_dict``, the optimizer's (momentum, Adam moments and
step counts, learning rates), the masks in force, the pruner's own state (a
:class:`~winnow.schedules.DynamicSparsity`'s masks, last step and gradient average; any
pruner's ``masks``), the history, the weights kept for ``save_at``, and the CPU generator's
state. Started again with the same arguments, it reads the file and continues from that
iteration: the data order and the learning-rate schedule continue from it (as for
``start_iteration``), so the records and weights equal those of an uninterrupted run.

The file is a ``winnow.tensors`` container (:mod:`winnow.io.tensor_file`), written atomically
(a kill while writing leaves the previous one): nested state becomes named tensors plus a JSON
skeleton, dictionaries as lists of ``[key, value]`` pairs so integer keys (the optimizer's
parameter indices) come back as integers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from winnow.core.masks import Masks
from winnow.io.tensor_file import load_tensors, save_tensors, tensor_metadata

KIND = "training-state"
VERSION = 1


def flatten(value: Any, tensors: dict[str, Tensor], names: dict[int, str] | None = None) -> Any:
    """``value`` as JSON data with every tensor moved to ``tensors`` (under a fresh name, once
    per tensor object) and replaced by ``{"tensor": name}``; dictionaries become
    ``{"dict": [[key, value], ...]}``."""
    names = {} if names is None else names
    if isinstance(value, Tensor):
        if id(value) not in names:
            names[id(value)] = f"t{len(tensors)}"
            # a copy: views of one storage (tied weights, shared masks) are stored apart
            tensors[names[id(value)]] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": names[id(value)]}
    if isinstance(value, Mapping):
        return {"dict": [[k, flatten(v, tensors, names)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        items = [flatten(v, tensors, names) for v in value]
        return {"list": items, "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(f"cannot store a {type(value).__name__} in a training state")


def unflatten(data: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The inverse of :func:`flatten`."""
    if "tensor" in data:
        return tensors[data["tensor"]]
    if "dict" in data:
        return {k: unflatten(v, tensors) for k, v in data["dict"]}
    if "list" in data:
        items = [unflatten(v, tensors) for v in data["list"]]
        return tuple(items) if data.get("tuple") else items
    return data["value"]


def save_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write a nested state (tensors, numbers, strings, lists, dicts) atomically."""
    tensors: dict[str, Tensor] = {}
    skeleton = flatten(dict(state), tensors)
    return save_tensors(path, tensors, {"kind": KIND, "version": VERSION, "state": skeleton})


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by :func:`save_state` (``TensorFileError`` if damaged)."""
    metadata = tensor_metadata(path)
    if metadata.get("kind") != KIND:
        raise ValueError(f"{path} is a tensor file but not a training state")
    return unflatten(metadata["state"], load_tensors(path))


def pruner_state(pruner: Any) -> dict[str, Any] | None:
    """A pruner's state: its ``state_dict()``, or its ``masks`` (None when it has neither)."""
    if pruner is None:
        return None
    if hasattr(pruner, "state_dict"):
        return {"state_dict": pruner.state_dict()}
    masks = getattr(pruner, "masks", None)
    if masks is None:
        return {}
    return {"masks": {n: m.cpu() for n, m in masks.items()}}


def restore_pruner(pruner: Any, state: Mapping[str, Any] | None) -> None:
    if pruner is None or state is None:
        return
    if "state_dict" in state:
        pruner.load_state_dict(state["state_dict"])
    elif "masks" in state:
        if not hasattr(pruner, "masks"):
            raise ValueError(f"cannot resume a pruner of type {type(pruner).__name__}")
        pruner.masks = Masks(dict(state["masks"]))


def capture(
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    masks: Masks | None,
    pruner: Any,
    history: list[dict],
    saved: Mapping[int, Mapping[str, Tensor]],
) -> dict[str, Any]:
    """The state of a training run after ``iteration`` steps."""
    return {
        "iteration": iteration,
        "model": dict(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "masks": None if masks is None else {n: m.cpu() for n, m in masks.items()},
        "pruner": pruner_state(pruner),
        "history": history,
        "saved": {str(k): dict(v) for k, v in saved.items()},
        "rng": torch.get_rng_state(),
    }
