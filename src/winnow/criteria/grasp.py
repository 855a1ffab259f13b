"""GraSP: Gradient Signal Preservation (Wang, Zhang & Grosse 2020, ICLR)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from winnow.criteria.losses import batch_loss, loss_gradient, weighted_losses
from winnow.criteria.options import Checked
from winnow.criteria.registry import register
from winnow.criteria.sampling import model_device, set_bn_mode
from winnow.inputs import LossFunction, sample


def hessian_gradient_product(
    work: nn.Module,
    params: dict[str, nn.Parameter],
    batches,
    temperature: float = 1.0,
    loss_fn: LossFunction | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(g, Hg)``: the loss gradient and the Hessian-gradient product at the current weights.

    g = ∂L/∂θ is computed once (logits divided by ``temperature``); Hg = ∂(gᵀ·stopgrad(g))/∂θ
    is obtained by differentiating the inner product of a differentiable gradient with the fixed
    g (Pearlmutter's trick). With one batch, a single forward pass serves both; with several, g
    is accumulated over all of them first, then Hg batch by batch with the same weighting.
    Attention runs on PyTorch's math kernels meanwhile (the fused ones have no double
    backward on the CPU).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return _hessian_gradient_product(work, params, batches, temperature, loss_fn)


def _hessian_gradient_product(work, params, batches, temperature, loss_fn):
    weights = list(params.values())
    if len(batches) == 1:  # one forward pass serves both gradients
        loss = batch_loss(work, batches[0], temperature, loss_fn)
        grad = torch.autograd.grad(loss, weights, create_graph=True)
        fixed = {n: g.detach() for n, g in zip(params, grad, strict=True)}
        inner = sum((g * fixed[n]).sum() for n, g in zip(params, grad, strict=True))
        hg = dict(zip(params, torch.autograd.grad(inner, weights), strict=True))
        return fixed, hg
    fixed = loss_gradient(work, params, batches, temperature, loss_fn)
    hg = {n: torch.zeros_like(p) for n, p in params.items()}
    for loss in weighted_losses(work, batches, temperature, loss_fn):
        grad = torch.autograd.grad(loss, weights, create_graph=True)
        inner = sum((g * fixed[n]).sum() for n, g in zip(params, grad, strict=True))
        for n, h in zip(params, torch.autograd.grad(inner, weights), strict=True):
            hg[n] += h
    return fixed, hg


@dataclass(frozen=True)
class GraspOptions(Checked):
    """``samples_per_class`` examples of each class (class-balanced, as the reference code),
    or ``samples`` drawn without balancing; ``temperature`` divides the logits for g;
    ``batch_size``, ``seed`` and ``bn_mode`` as for SNIP; ``loss_fn(model, batch)`` replaces
    the temperature-scaled cross-entropy."""

    samples_per_class: int = 10
    samples: int | None = None
    temperature: float = 200.0
    batch_size: int | None = None
    seed: int = 0
    bn_mode: str = "train"
    loss_fn: LossFunction | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"GraspOptions.temperature must be > 0, got {self.temperature!r}")


@register("grasp", GraspOptions, needs_data=True)
def grasp(
    work: nn.Module, params: dict[str, nn.Parameter], data, options: GraspOptions, state=None
) -> dict[str, Tensor]:
    """GraSP (Wang et al. 2020): keep the weights whose removal would reduce ‖g‖ the most.

    The paper scores S(−θ) = −θ ⊙ Hg, the first-order change of the gradient norm ΔL(θ) when
    a weight is removed, and *removes the weights with the highest S(−θ)* (removing them reduces
    the gradient flow least, or increases it). winnow's convention is "higher = keep", so this
    returns ``-S(-θ) = θ ⊙ Hg``: keeping its top-k keeps the lowest S(−θ).

    Data: ``samples_per_class`` examples of each class (10, as the reference code), or
    ``samples`` drawn without balancing; g uses logits divided by ``temperature`` (200 in the
    paper). BatchNorm uses batch statistics by default (``bn_mode="train"``).
    """
    set_bn_mode(work, options.bn_mode)
    per_class = None if options.samples is not None else options.samples_per_class
    batches = sample(
        data,
        options.samples or 0,
        options.batch_size,
        per_class=per_class,
        seed=options.seed,
        device=model_device(work),
    )
    _, hg = hessian_gradient_product(work, params, batches, options.temperature, options.loss_fn)
    return {n: p.detach() * hg[n] for n, p in params.items()}
