"""The baselines Pruning from Scratch is compared with, on the same FLOPs budget.

- Network slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through
  Network Slimming"): train with an L1 penalty ``s·Σ|γ|`` on every BatchNorm scale γ
  (:func:`bn_l1`, a regularizer for :func:`winnow.train`; s = 1e-4 in the paper), then prune
  the channels with the smallest |γ| under one global threshold (:func:`slimming_structure`).
- L1-norm filter pruning (Li et al. 2017, "Pruning Filters for Efficient ConvNets"), after
  training: a filter's importance is the L1 norm of its weights Σ|W_c|
  (:func:`l1_filter_scores`), ranked within each layer at one common fraction, or globally
  (:func:`l1_filter_structure`).
- Uniform width scaling: one factor on every width (:func:`winnow.structured.uniform_structure`).

Each returns a :class:`~winnow.structured.budget.Structure` whose FLOPs meet the budget by
bisection, like Pruning from Scratch (:func:`winnow.structured.threshold_for_budget`). Only
the groups that Pruning from Scratch gates are pruned (prunable and, unless
``include_tied=True``, not tied by a residual addition).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from winnow.core.densities import check_scope
from winnow.structured.budget import (
    Structure,
    as_analysis,
    default_groups,
    threshold_for_budget,
    uniform_structure,
)
from winnow.structured.dependency import NORMS, Analysis
from winnow.training import TrainConfig, TrainResult, train


def bn_l1(strength: float = 1e-4) -> Callable[[nn.Module], Tensor]:
    """Network slimming's sparsity penalty: ``strength · Σ |γ|`` over every BatchNorm scale γ.

    Pass it as ``regularizer`` to :func:`winnow.train`; its (sub)gradient is
    ``strength · sign(γ)`` (Liu et al. 2017, Eq. 1; s = 1e-4 for VGG on CIFAR in the paper).
    """
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")

    def penalty(model: nn.Module) -> Tensor:
        scales = [m.weight for m in model.modules() if isinstance(m, NORMS) and m.affine]
        if not scales:
            raise ValueError("network slimming needs BatchNorm layers with affine scales")
        return strength * sum(w.abs().sum() for w in scales)

    return penalty


def bn_scores(
    model: nn.Module | Analysis,
    input_shape: Sequence[int] | None = None,
    *,
    include_tied: bool = False,
) -> dict[str, Tensor]:
    """|γ| of the BatchNorm after each channel, per group (summed over a tied group's norms).

    Groups without a BatchNorm get no score (slimming leaves them at full width).
    """
    analysis = as_analysis(model, input_shape)
    scores = {}
    for group in default_groups(analysis, include_tied):
        norms = [analysis.graph.get_submodule(n) for n in group.norms]
        norms = [n for n in norms if n.affine]
        if norms:
            scores[group.name] = sum(n.weight.detach().abs().cpu() for n in norms)
    return scores


def slimming_structure(
    model: nn.Module | Analysis,
    budget: float,
    input_shape: Sequence[int] | None = None,
    *,
    include_tied: bool = False,
    bisections: int = 10,
    tolerance: float = 1e-3,
    round_to: int = 1,
    seed: int = 0,
) -> Structure:
    """Network slimming's selection on a model trained with :func:`bn_l1`: the channels with
    the largest |γ| under one global threshold, at ``budget`` (fraction of the dense FLOPs)."""
    analysis = as_analysis(model, input_shape)
    scores = bn_scores(analysis, include_tied=include_tied)
    if not scores:
        raise ValueError("no prunable group has a BatchNorm: network slimming does not apply")
    return threshold_for_budget(
        scores,
        analysis,
        budget,
        bisections=bisections,
        tolerance=tolerance,
        round_to=round_to,
        seed=seed,
    )


def network_slimming(
    model: nn.Module,
    data,
    budget: float,
    config: TrainConfig,
    *,
    strength: float = 1e-4,
    device: torch.device | str = "cpu",
    **selection,
) -> tuple[Structure, nn.Module, TrainResult]:
    """Network slimming end to end: train a copy of ``model`` on ``data`` with :func:`bn_l1`,
    then :func:`slimming_structure` at ``budget``. Returns the structure, the trained copy and
    its training result; ``model`` is not changed. ``selection`` goes to
    :func:`slimming_structure` (``round_to``, ``seed``, ...)."""
    trained = copy.deepcopy(model)
    result = train(trained, data, config, regularizer=bn_l1(strength), device=device)
    structure = slimming_structure(trained, budget, data.input_shape, **selection)
    return structure, trained, result


def l1_filter_scores(
    model: nn.Module | Analysis,
    input_shape: Sequence[int] | None = None,
    *,
    normalize: bool = True,
    include_tied: bool = False,
) -> dict[str, Tensor]:
    """The L1 norm Σ|W_c| of each output filter (neuron), per group (Li et al. 2017, Sec. 3.1).

    With ``normalize`` each norm is divided by the mean norm of its layer, so that filters of
    layers with different fan-in and scale can be ranked together (Li et al. rank within a
    layer only); a tied group sums the scores of its producers.
    """
    analysis = as_analysis(model, input_shape)
    scores = {}
    for group in default_groups(analysis, include_tied):
        total = torch.zeros(group.size, dtype=torch.float64)
        for name in group.producers:
            weight = analysis.graph.get_submodule(name).weight.detach().cpu().double()
            norms = weight.abs().flatten(1).sum(1)
            if normalize:
                norms = norms / norms.mean().clamp_min(torch.finfo(torch.float64).tiny)
            total += norms
        scores[group.name] = total
    return scores


def l1_filter_structure(
    model: nn.Module | Analysis,
    budget: float,
    input_shape: Sequence[int] | None = None,
    *,
    scope: str = "global",
    include_tied: bool = False,
    bisections: int = 10,
    tolerance: float = 1e-3,
    round_to: int = 1,
    seed: int = 0,
) -> Structure:
    """L1-norm filter pruning of a trained model to ``budget`` (fraction of the dense FLOPs).

    ``scope="global"``: one threshold on the layer-normalised L1 norms
    (:func:`l1_filter_scores`); ``scope="layer"``: every layer keeps the same fraction of its
    filters, its largest by L1 norm (widths as uniform scaling, channels by norm).
    """
    check_scope(scope)
    analysis = as_analysis(model, input_shape)
    scores = l1_filter_scores(analysis, include_tied=include_tied)
    if scope == "layer":
        return uniform_structure(
            analysis,
            budget,
            groups=list(scores),
            scores=scores,
            bisections=bisections,
            tolerance=tolerance,
            round_to=round_to,
        )
    return threshold_for_budget(
        scores,
        analysis,
        budget,
        bisections=bisections,
        tolerance=tolerance,
        round_to=round_to,
        seed=seed,
    )
