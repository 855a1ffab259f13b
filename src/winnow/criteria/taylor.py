"""First-order Taylor importance of output units through gates (Molchanov et al. 2017, 2019).

A gate α = 1 multiplies every output unit (conv channel, Linear neuron) of each prunable
layer; removing the unit sets α = 0, which changes the loss by about ∂L/∂α to first order.
The importance of unit c is Σ_batches |∂L/∂α_c| with ∂L/∂α_c = Σ_positions a_c · ∂L/∂a_c
(Molchanov et al. 2017, "Pruning convolutional neural networks for resource efficient
inference", ICLR; 2019, "Importance estimation for neural network pruning", CVPR).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from winnow.criteria.losses import batch_loss
from winnow.criteria.options import Checked
from winnow.criteria.registry import register
from winnow.criteria.sampling import model_device, set_bn_mode
from winnow.inputs import LossFunction, sample


@dataclass(frozen=True)
class TaylorOptions(Checked):
    """``samples`` training examples in batches of ``batch_size``, drawn with ``seed``;
    BatchNorm in ``bn_mode`` (eval by default: see :func:`taylor`)."""

    samples: int = 1000
    batch_size: int = 100
    seed: int = 0
    bn_mode: str = "eval"
    loss_fn: LossFunction | None = None


@register("taylor", TaylorOptions, needs_data=True)
def taylor(
    work: nn.Module, params: dict[str, nn.Parameter], data, options: TaylorOptions, state=None
) -> dict[str, Tensor]:
    """Σ_batches |∂L/∂α_c| for the output unit c of each prunable weight, broadcast to the
    weights of that unit (every weight of a filter or neuron gets its unit's score), so that
    :func:`winnow.core.select_groups` with ``group="filter"`` removes whole units.

    BatchNorm runs in eval mode by default: in train mode it normalises away any scale of its
    input, so a gate in front of it would always get a zero gradient.
    """
    set_bn_mode(work, options.bn_mode)
    owners = {}
    for module_name, module in work.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if full in params and name == "weight":
                owners[full] = module
    missing = set(params) - set(owners)
    if missing:
        raise ValueError(f"taylor scores module weights only; cannot gate {sorted(missing)}")
    gates: dict[str, Tensor] = {}
    handles = []
    for full, module in owners.items():
        units = params[full].shape[0]
        gate = torch.ones(units, device=params[full].device, requires_grad=True)
        gates[full] = gate

        def hook(mod, inputs, output, gate=gate):
            shape = (1, -1) + (1,) * (output.dim() - 2)
            return output * gate.view(shape)

        handles.append(module.register_forward_hook(hook))
    importance = {n: torch.zeros_like(g, dtype=torch.float64) for n, g in gates.items()}
    try:
        device = model_device(work)
        batches = sample(
            data, options.samples, options.batch_size, seed=options.seed, device=device
        )
        for batch in batches:
            loss = batch_loss(work, batch, loss_fn=options.loss_fn)
            grads = torch.autograd.grad(loss, list(gates.values()))
            for name, g in zip(gates, grads, strict=True):
                importance[name] += g.detach().abs().double()
    finally:
        for handle in handles:
            handle.remove()
    return {
        n: importance[n].to(p.dtype).view(-1, *([1] * (p.dim() - 1))).expand_as(p).clone()
        for n, p in params.items()
    }
