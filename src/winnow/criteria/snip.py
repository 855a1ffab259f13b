"""SNIP: connection sensitivity at initialisation (Lee et al. 2019, ICLR)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from winnow.criteria.losses import loss_gradient
from winnow.criteria.options import Checked
from winnow.criteria.registry import register
from winnow.criteria.sampling import model_device, set_bn_mode
from winnow.inputs import LossFunction, sample


@dataclass(frozen=True)
class SnipOptions(Checked):
    """``samples`` training examples (one batch of 128 by default, split into batches of
    ``batch_size`` if given), drawn with ``seed``; BatchNorm in ``bn_mode``; ``loss_fn(model,
    batch)`` in place of the cross-entropy."""

    samples: int = 128
    batch_size: int | None = None
    seed: int = 0
    bn_mode: str = "train"
    loss_fn: LossFunction | None = None


@register("snip", SnipOptions, needs_data=True)
def snip(
    work: nn.Module, params: dict[str, nn.Parameter], data, options: SnipOptions, state=None
) -> dict[str, Tensor]:
    """SNIP (Lee et al. 2019): ``|g ⊙ θ|`` with g = ∂L/∂θ on one batch of ``samples`` examples.

    The score is the magnitude of the first-order change of the loss when a connection is
    removed (the paper's connection sensitivity, before its normalisation, which does not change
    the ranking). ``bn_mode``: BatchNorm uses batch statistics (``"train"``, the default, as the
    reference code) or running statistics (``"eval"``); the caller's model is never changed.
    """
    set_bn_mode(work, options.bn_mode)
    batches = sample(
        data, options.samples, options.batch_size, seed=options.seed, device=model_device(work)
    )
    grads = loss_gradient(work, params, batches, loss_fn=options.loss_fn)
    return {n: (grads[n] * p.detach()).abs() for n, p in params.items()}
