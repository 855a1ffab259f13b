"""The loss a data-driven criterion differentiates, and its gradient over several batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn


def weighted_losses(work: nn.Module, batches, temperature: float = 1.0) -> Iterator[Tensor]:
    """Each batch's mean cross-entropy (logits divided by ``temperature``), weighted by the
    batch's share of the examples: the losses sum to the mean loss over all examples."""
    total = sum(len(y) for _, y in batches)
    for x, y in batches:
        yield nn.functional.cross_entropy(work(x) / temperature, y) * (len(y) / total)


def loss_gradient(
    work: nn.Module, params: dict[str, nn.Parameter], batches, temperature: float = 1.0
) -> dict[str, Tensor]:
    """g = ∂L/∂θ of the mean cross-entropy over ``batches`` (logits divided by ``temperature``),
    the same whatever the batching."""
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for loss in weighted_losses(work, batches, temperature):
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            grads[n] += g
    return grads
