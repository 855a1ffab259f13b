"""Analyses of masks and pruned networks, as in the papers' figures.

- :func:`gradient_norm`: ‖∂L/∂θ‖ of the (pruned) network on a sample of data, the quantity
  GraSP preserves (Wang et al. 2020, Figure 1 / Table 5).
- :func:`layer_densities` and :func:`layer_density_table`: the fraction kept per layer for
  several methods side by side (GraSP Figure 4, SynFlow Figure 2).
- :func:`shuffle_within_layers`: the sanity check of Frankle et al. 2021 ("Pruning neural
  networks at initialization: why are we missing the mark?"): permute each layer's mask,
  keeping every layer's density; a method whose accuracy survives this did not find *which*
  weights matter, only *how many* per layer.
- Layer collapse: :meth:`winnow.Masks.collapsed_layers` and :func:`is_connected`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from winnow.core.masks import Masks
from winnow.core.prunable import prunable_parameters
from winnow.criteria.losses import loss_gradient
from winnow.criteria.sampling import DataSource, model_device, set_bn_mode
from winnow.inputs import sample


def gradient_norm(
    model: nn.Module,
    data: DataSource,
    masks: Masks | None = None,
    samples: int = 256,
    temperature: float = 1.0,
    seed: int = 0,
    bn_mode: str = "train",
) -> float:
    """‖g‖₂ with g = ∂L/∂θ over the prunable weights, on ``samples`` training examples.

    With ``masks``, the pruned weights are zeroed first and their gradients left out (the
    gradient norm of the pruned network, as GraSP reports it). ``model`` is not changed.
    """
    work = copy.deepcopy(model)
    set_bn_mode(work, bn_mode)
    names = list(masks) if masks is not None else None
    params = prunable_parameters(work, names)
    if masks is not None:
        masks.apply(work)
    batches = sample(data, samples, seed=seed, device=model_device(work))
    grads = loss_gradient(work, params, batches, temperature)
    total = 0.0
    for name, g in grads.items():
        if masks is not None:
            g = g * masks[name].to(g.device)
        total += float((g.double() ** 2).sum())
    return total**0.5


def layer_densities(masks_by_label: Mapping[str, Masks]) -> dict[str, dict[str, float]]:
    """Fraction kept per layer for several masks: layer name -> {label: density}."""
    if not masks_by_label:
        return {}
    layers = list(next(iter(masks_by_label.values())))
    table: dict[str, dict[str, float]] = {name: {} for name in layers}
    for label, masks in masks_by_label.items():
        for name, density in masks.layer_density().items():
            table.setdefault(name, {})[label] = density
    return table


def layer_density_table(masks_by_label: Mapping[str, Masks]) -> str:
    """:func:`layer_densities` as a markdown table (percentages), with the overall density."""
    table = layer_densities(masks_by_label)
    labels = list(masks_by_label)
    lines = ["| layer | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name, row in table.items():
        cells = [f"{100 * row[label]:.2f}%" if label in row else "" for label in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    overall = [f"{100 * masks_by_label[label].density():.2f}%" for label in labels]
    lines.append("| **all** | " + " | ".join(overall) + " |")
    return "\n".join(lines)


def shuffle_within_layers(masks: Masks, seed: int = 0) -> Masks:
    """Each layer's mask randomly permuted within the layer (same per-layer density).

    Frankle et al. 2021's layerwise-shuffle control. Seeded; never changes ``masks``.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mask in masks.items():
        perm = torch.randperm(mask.numel(), generator=gen).to(mask.device)
        out[name] = mask.flatten()[perm].reshape(mask.shape)
    return Masks(out)


def is_connected(masks: Masks) -> bool:
    """Whether a path of kept weights joins input to output through a chain of layers.

    Treats the masks, in order, as the layers of a feed-forward chain: a Linear weight
    ``(out, in)``; a convolution ``(out, in, *kernel)`` connects an input channel to an output
    channel when any kernel entry is kept. Layers whose input size does not match the previous
    output (a flatten between conv and linear) are joined by expanding channels to the
    positions they feed. A residual network's skip connections are ignored (a conservative
    answer: False may still have a path through a shortcut).
    """
    reach: torch.Tensor | None = None
    for mask in masks.values():
        if mask.dim() < 2:
            continue
        layer = mask.flatten(2).any(2) if mask.dim() > 2 else mask
        layer = layer.double().cpu()
        if reach is not None and layer.shape[1] != reach.shape[0]:
            if layer.shape[1] % reach.shape[0]:
                raise ValueError(
                    f"cannot chain a layer of input size {layer.shape[1]} after "
                    f"one of output size {reach.shape[0]}"
                )
            reach = reach.repeat_interleave(layer.shape[1] // reach.shape[0])
        reach = layer.sum(1) > 0 if reach is None else (layer @ reach.double()) > 0
        reach = reach.double()
        if not bool(reach.any()):
            return False
    return reach is not None and bool(reach.any())
