"""Penalties on the weights (or on BatchNorm scales) added to the loss: L1, Hoyer-Square,
group lasso and polarisation, each with the scores a threshold keeps (Hoefler et al. 2021,
§3.6)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from winnow.core.densities import check_scope
from winnow.core.prunable import prunable_parameters

GROUPS: dict[str, int] = {"filter": 0, "neuron": 0, "channel": 1}
"""Group name -> the axis a group is a slice of: a filter (convolution) or neuron (Linear) is
an output unit, ``weight[i]``; a channel is an input unit, ``weight[:, j]``."""


def check_strength(strength: float) -> float:
    value = float(strength)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
    return value


def check_group(group: str) -> int:
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; choose one of {tuple(GROUPS)}")
    return GROUPS[group]


def parameter_names(names: Iterable[str] | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str):
        raise TypeError("names must be a list of parameter names, not a single string")
    return tuple(names)


def _safe_norm(squares: Tensor) -> Tensor:
    """sqrt(squares), with the subgradient 0 (not NaN) where ``squares`` is exactly 0."""
    positive = squares > 0
    return torch.where(positive, torch.where(positive, squares, 1.0).sqrt(), 0.0)


def _group_norms(weight: Tensor, axis: int) -> Tensor:
    """‖θ_g‖₂ of every slice ``weight.select(axis, i)``, kept as a broadcastable shape."""
    dims = [d for d in range(weight.dim()) if d != axis]
    return _safe_norm(weight.square().sum(dim=dims, keepdim=True))


class Regularizer:
    """A penalty ``λ · R(θ)`` on chosen parameters, and the scores to threshold afterwards.

    Subclasses define :meth:`penalty` (R on a mapping of tensors, without λ) and
    :meth:`scores`. ``names`` (``None``: the prunable weights of the model) are fully
    qualified parameter names, resolved on the model given to each call.
    """

    def __init__(self, strength: float, names: Iterable[str] | None = None) -> None:
        self.strength = check_strength(strength)
        self.names = parameter_names(names)

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters penalised, by name (see :func:`winnow.prunable_parameters`)."""
        return prunable_parameters(model, self.names)

    def penalty(self, tensors: dict[str, Tensor]) -> Tensor:
        """R(θ) without the strength λ."""
        raise NotImplementedError

    def scores(self, model: nn.Module) -> dict[str, Tensor]:
        """Scores by parameter name, higher = kept: ``winnow.select(scores, density)``."""
        raise NotImplementedError

    def __call__(self, model: nn.Module) -> Tensor:
        """``λ · R(θ)``, a scalar tensor (differentiable in the parameters)."""
        return self.strength * self.penalty(self.parameters(model))

    def _extra(self) -> str:
        return ""

    def __repr__(self) -> str:
        names = "" if self.names is None else f", names={list(self.names)!r}"
        return f"{type(self).__name__}(strength={self.strength:g}{self._extra()}{names})"


class L1(Regularizer):
    """L1 (lasso) penalty: ``λ · Σ_l Σ_i |θ_i|`` (Tibshirani 1996; Hoefler et al. 2021, §3.6.1).

    The subgradient at θ_i = 0 is 0. Scores for the threshold that follows: |θ| (magnitude).
    """

    def penalty(self, tensors: dict[str, Tensor]) -> Tensor:
        return sum(t.abs().sum() for t in tensors.values())

    def scores(self, model: nn.Module) -> dict[str, Tensor]:
        return {n: p.detach().abs() for n, p in self.parameters(model).items()}


class Hoyer(Regularizer):
    """Hoyer-Square penalty, summed over layers: ``λ · Σ_l ‖θ_l‖₁² / ‖θ_l‖₂²``.

    Yang, Wen & Li 2020, "DeepHoyer: Learning Sparser Neural Network with Differentiable
    Scale-Invariant Sparsity Measures" (ICLR): H_S(θ) = (Σ|θ_i|)² / Σθ_i², between 1 (one
    non-zero weight) and n (all equal), scale invariant. A layer whose weights are all zero
    contributes 0 with gradient 0. Scores: |θ|.
    """

    def penalty(self, tensors: dict[str, Tensor]) -> Tensor:
        total = 0.0
        for t in tensors.values():
            l1, squares = t.abs().sum(), t.square().sum()
            positive = squares > 0
            total = total + torch.where(
                positive, l1.square() / torch.where(positive, squares, 1.0), 0.0
            )
        return total

    def scores(self, model: nn.Module) -> dict[str, Tensor]:
        return {n: p.detach().abs() for n, p in self.parameters(model).items()}


class GroupLasso(Regularizer):
    """Group lasso over filters, channels or neurons: ``λ · Σ_g w_g · ‖θ_g‖₂``.

    Yuan & Lin 2006, "Model selection and estimation in regression with grouped variables";
    for neural networks, Wen et al. 2016, "Learning Structured Sparsity in Deep Neural
    Networks" (SSL, filter-wise and channel-wise). Groups, in every chosen tensor:

    - ``"filter"``: an output channel of a convolution, ``θ[i, :, ...]`` (dim 0);
    - ``"neuron"``: an output neuron of a Linear layer, the row ``θ[i, :]`` (dim 0, the same
      slices as ``"filter"``; removing it removes the neuron);
    - ``"channel"``: an input channel (or input feature of a Linear layer), ``θ[:, j, ...]``
      (dim 1).

    ``weighted=True`` (default) uses Yuan & Lin's weights w_g = sqrt(|g|), the number of
    weights in the group, so that groups of different sizes are penalised alike;
    ``weighted=False`` uses w_g = 1 (Wen et al.'s Eq. 2). At ‖θ_g‖ = 0 the subgradient 0 is
    used. Scores: ‖θ_g‖₂ broadcast to every weight of the group, so a threshold removes whole
    groups (the group lasso's own ranking, without w_g).
    """

    def __init__(
        self,
        strength: float,
        group: str = "filter",
        names: Iterable[str] | None = None,
        weighted: bool = True,
    ) -> None:
        super().__init__(strength, names)
        self.axis = check_group(group)
        self.group = group
        self.weighted = bool(weighted)

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = super().parameters(model)
        for name, p in params.items():
            if p.dim() <= self.axis or p.dim() < 2:
                raise ValueError(
                    f"group {self.group!r} needs a tensor of at least 2 dimensions; "
                    f"{name!r} has shape {tuple(p.shape)}"
                )
        return params

    def penalty(self, tensors: dict[str, Tensor]) -> Tensor:
        total = 0.0
        for t in tensors.values():
            norms = _group_norms(t, self.axis)
            weight = math.sqrt(t.numel() // t.shape[self.axis]) if self.weighted else 1.0
            total = total + weight * norms.sum()
        return total

    def scores(self, model: nn.Module) -> dict[str, Tensor]:
        return {
            n: _group_norms(p.detach(), self.axis).expand_as(p).clone()
            for n, p in self.parameters(model).items()
        }

    def _extra(self) -> str:
        return f", group={self.group!r}, weighted={self.weighted}"


def batchnorm_scales(model: nn.Module) -> dict[str, nn.Parameter]:
    """The scale γ (``weight``) of every affine BatchNorm layer of ``model``, by name."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            found.setdefault(by_id[id(module.weight)], module.weight)
    return found


class Polarization(Regularizer):
    """Polarisation of scaling factors: ``λ · (t‖γ‖₁ − ‖γ − mean(γ)·1‖₁)``.

    Zhuang et al. 2020, "Neuron-level Structured Pruning using Polarization Regularizer"
    (NeurIPS), Eq. 2: R_s(γ) = Σ_i t|γ_i| − |γ_i − γ̄|. The first term pulls every γ towards
    0, the second pushes them away from their mean, so the scaling factors split into a group
    at 0 and a group away from it. ``scope="global"`` (the paper) takes γ̄ over all the scaling
    factors of the network together; ``"layer"`` computes R per tensor and sums. The paper
    also clamps γ to [0, a] during training; that clamp is not applied here.

    The targets are the BatchNorm scales γ by default (:func:`batchnorm_scales`), or any
    1-D parameters named in ``names`` (e.g. channel gates). Scores: |γ| per channel, keyed by
    the scale's name (``winnow.select`` then gives a channel mask per BatchNorm layer; the
    same ranking as network slimming's :func:`winnow.structured.baselines.bn_scores`).
    """

    def __init__(
        self,
        strength: float,
        t: float = 1.2,
        names: Iterable[str] | None = None,
        scope: str = "global",
    ) -> None:
        super().__init__(strength, names)
        if not float(t) > 0 or math.isinf(float(t)):
            raise ValueError(f"t must be a finite number > 0, got {t!r}")
        check_scope(scope)
        self.t = float(t)
        self.scope = scope

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        if self.names is None:
            params = batchnorm_scales(model)
            if not params:
                raise ValueError(
                    f"{type(model).__name__} has no affine BatchNorm layer; pass the names of "
                    "the 1-D scaling factors to polarise"
                )
            return params
        params = prunable_parameters(model, self.names)
        for name, p in params.items():
            if p.dim() != 1:
                raise ValueError(
                    f"polarisation acts on 1-D scaling factors; {name!r} has shape {tuple(p.shape)}"
                )
        return params

    def _one(self, gamma: Tensor) -> Tensor:
        return self.t * gamma.abs().sum() - (gamma - gamma.mean()).abs().sum()

    def penalty(self, tensors: dict[str, Tensor]) -> Tensor:
        if self.scope == "global":
            return self._one(torch.cat([t.reshape(-1) for t in tensors.values()]))
        return sum(self._one(t) for t in tensors.values())

    def scores(self, model: nn.Module) -> dict[str, Tensor]:
        return {n: p.detach().abs() for n, p in self.parameters(model).items()}

    def _extra(self) -> str:
        return f", t={self.t:g}, scope={self.scope!r}"
