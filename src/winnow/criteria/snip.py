"""SNIP: connection sensitivity at initialisation (Lee et al. 2019, ICLR)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from winnow.criteria._registry import register
from winnow.criteria.data import model_device, sample_batches, set_bn_mode


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


@register("snip", needs_data=True)
def snip(
    work: nn.Module,
    params: dict[str, nn.Parameter],
    data,
    samples: int = 128,
    batch_size: int | None = None,
    seed: int = 0,
    bn_mode: str = "train",
) -> dict[str, Tensor]:
    """SNIP (Lee et al. 2019): ``|g ⊙ θ|`` with g = ∂L/∂θ on one batch of ``samples`` examples.

    The score is the magnitude of the first-order change of the loss when a connection is
    removed (the paper's connection sensitivity, before its normalisation, which does not change
    the ranking). ``bn_mode``: BatchNorm uses batch statistics (``"train"``, the default, as the
    reference code) or running statistics (``"eval"``); the caller's model is never changed.
    """
    set_bn_mode(work, bn_mode)
    batches = sample_batches(data, samples, batch_size, seed=seed, device=model_device(work))
    grads = loss_gradient(work, params, batches)
    return {n: (grads[n] * p.detach()).abs() for n, p in params.items()}
