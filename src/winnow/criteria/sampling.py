"""Turning the data a criterion is given into a few batches on the model's device."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from winnow.data import DataSplits

DataSource = DataSplits | tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]


def sample_batches(
    data: DataSource,
    samples: int,
    batch_size: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[tuple[Tensor, Tensor]]:
    """A seeded sample of training examples, split into batches on ``device``.

    - ``data``: a :class:`DataSplits` (its training split is used), a pair ``(x, y)``, or an
      iterable of ``(x, y)`` batches (consumed in order until ``samples`` examples are taken).
    - ``samples``: how many examples; ``per_class``: instead, that many of each class
      (class-balanced, as GraSP's reference code samples), for tensors only.
    - ``batch_size``: size of each returned batch (default: all in one batch).
    """
    if isinstance(data, DataSplits):
        data = (data.x_train, data.y_train)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        if per_class is not None:
            labels = y[order].cpu()
            chosen = []
            for cls in torch.unique(labels).tolist():
                chosen.append(order[labels == cls][:per_class])
            order = torch.cat(chosen)
            order = order[torch.argsort(order)]
        else:
            order = order[:samples]
        xs, ys = x[order.to(x.device)], y[order.to(y.device)]
    else:
        if per_class is not None:
            raise ValueError("per_class sampling needs tensors (a DataSplits or (x, y))")
        xs_list, ys_list, taken = [], [], 0
        for xb, yb in data:
            xs_list.append(xb)
            ys_list.append(yb)
            taken += len(xb)
            if taken >= samples:
                break
        if not xs_list:
            raise ValueError("the data source yielded no batch")
        xs, ys = torch.cat(xs_list)[:samples], torch.cat(ys_list)[:samples]
    if len(xs) == 0:
        raise ValueError("no examples to score with")
    size = batch_size or len(xs)
    return [
        (xs[i : i + size].to(device), ys[i : i + size].to(device)) for i in range(0, len(xs), size)
    ]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


BN_MODES = ("train", "eval")


def set_bn_mode(model: torch.nn.Module, bn_mode: str) -> None:
    """Put ``model`` in train mode (BatchNorm uses batch statistics) or eval mode (running
    statistics) for scoring; ``ValueError`` for any other value."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}; choose one of {BN_MODES}")
    model.train(bn_mode == "train")
