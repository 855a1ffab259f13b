"""The loss a data-driven criterion differentiates, and its gradient over several batches.

The loss of a batch is ``loss_fn(model, batch)``: by default :func:`winnow.inputs.default_loss`
(the model's cross-entropy, or its own ``.loss``), with the logits divided by a temperature
where a criterion asks for one (GraSP); a criterion's ``loss_fn`` option replaces it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from winnow.inputs import LossFunction, default_loss, size


def batch_loss(
    work: nn.Module, batch, temperature: float = 1.0, loss_fn: LossFunction | None = None
) -> Tensor:
    """The loss of one batch: ``loss_fn(work, batch)``, or the default cross-entropy with the
    logits divided by ``temperature``."""
    if loss_fn is not None:
        return loss_fn(work, batch)
    return default_loss(work, batch, temperature)


def weighted_losses(
    work: nn.Module, batches, temperature: float = 1.0, loss_fn: LossFunction | None = None
) -> Iterator[Tensor]:
    """Each batch's mean loss weighted by the batch's share of the examples: the losses sum to
    the mean loss over all examples."""
    total = sum(size(b) for b in batches)
    for batch in batches:
        yield batch_loss(work, batch, temperature, loss_fn) * (size(batch) / total)


def loss_gradient(
    work: nn.Module,
    params: dict[str, nn.Parameter],
    batches,
    temperature: float = 1.0,
    loss_fn: LossFunction | None = None,
) -> dict[str, Tensor]:
    """g = ∂L/∂θ of the mean loss over ``batches``, the same whatever the batching."""
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for loss in weighted_losses(work, batches, temperature, loss_fn):
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            grads[n] += g
    return grads
