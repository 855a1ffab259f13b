"""A differentiable pruning function with a learned threshold per layer (Manessi et al. 2018)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from winnow.core.masks import Masks
from winnow.regularizers._parametrized import attach, finalize_gates, original, require_gates
from winnow.regularizers.penalties import check_strength


def pruning_function(theta: Tensor, threshold: Tensor | float, sharpness: float) -> Tensor:
    """Manessi et al.'s differentiable pruning function, applied element-wise:

        θ̂ = ReLU(θ − t) + t·σ(α(θ − t)) − ReLU(−θ − t) − t·σ(α(−θ − t)),

    with threshold t >= 0 and sharpness α > 0 (Manessi et al. 2018, "Automated Pruning for
    Deep Neural Network Compression", ICPR). It is odd, close to 0 for |θ| < t, close to θ
    for |θ| > t, and tends to the hard threshold θ·1[|θ| > t] as α → ∞.
    """
    return (
        torch.relu(theta - threshold)
        + threshold * torch.sigmoid(sharpness * (theta - threshold))
        - torch.relu(-theta - threshold)
        - threshold * torch.sigmoid(sharpness * (-theta - threshold))
    )


class ThresholdPruning(nn.Module):
    """A parametrisation ``θ ↦ pruning_function(θ, t, α)`` with one learned threshold per
    tensor, t = softplus(ρ) >= 0 (ρ is the parameter ``raw_threshold``)."""

    def __init__(
        self,
        init_threshold: float,
        sharpness: float,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not init_threshold > 0:
            raise ValueError(f"init_threshold must be > 0, got {init_threshold!r}")
        if not sharpness > 0:
            raise ValueError(f"sharpness must be > 0, got {sharpness!r}")
        self.sharpness = float(sharpness)
        raw = math.log(math.expm1(init_threshold))  # softplus⁻¹
        self.raw_threshold = nn.Parameter(torch.tensor(raw, dtype=dtype, device=device))

    def threshold(self) -> Tensor:
        """t = softplus(ρ)."""
        return nn.functional.softplus(self.raw_threshold)

    def forward(self, weight: Tensor) -> Tensor:
        return pruning_function(weight, self.threshold(), self.sharpness)

    def extra_repr(self) -> str:
        return f"threshold={float(self.threshold()):.4g}, sharpness={self.sharpness:g}"


class LearnedThreshold:
    """Learned per-layer thresholds through a differentiable pruning function (Manessi et
    al. 2018, "Automated Pruning for Deep Neural Network Compression", ICPR).

    :meth:`attach` replaces each chosen weight θ of a copy of the model by
    :func:`pruning_function` (θ, t, α), with a learned threshold t = softplus(ρ) >= 0 per
    tensor and a fixed sharpness α. The penalty rewards large thresholds,

        λ · R = −λ · Σ_l t_l,

    so that training raises each threshold until the data loss pushes back (the paper adds
    a regulariser designed to enforce pruning; this linear form is winnow's choice).
    :meth:`finalize` applies the hard threshold θ·1[|θ| > t] and returns the plain model and
    the masks |θ| > t. ``scores``: |θ| − t_l, so that a global ``winnow.select`` at the
    finalised density keeps the same weights.

    State: the weights are under ``<module>.parametrizations.<name>.original`` and the
    thresholds under ``<module>.parametrizations.<name>.0.raw_threshold``.
    """

    def __init__(self, strength: float = 1e-3) -> None:
        self.strength = check_strength(strength)

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        names: Iterable[str] | None = None,
        *,
        strength: float = 1e-3,
        init_threshold: float = 1e-3,
        sharpness: float = 1000.0,
    ) -> tuple[nn.Module, LearnedThreshold]:
        """A copy of ``model`` with a pruning function on each chosen parameter (default: the
        prunable weights), and the penalty to train it with; ``model`` is unchanged.

        ``init_threshold`` and ``sharpness`` are in the units of the weights (α·t >> 1 makes
        the function close to the hard threshold).
        """
        reg = cls(strength)

        def make(name: str, param: Tensor) -> ThresholdPruning:
            return ThresholdPruning(init_threshold, sharpness, param.dtype, param.device)

        return attach(model, names, make), reg

    @staticmethod
    def thresholds(model: nn.Module) -> dict[str, ThresholdPruning]:
        """The pruning functions of a model made by :meth:`attach`, by plain parameter name."""
        return require_gates(model, ThresholdPruning, "LearnedThreshold.attach")

    def __call__(self, model: nn.Module) -> Tensor:
        """``−λ · Σ_l t_l``, a scalar tensor."""
        return -self.strength * sum(p.threshold() for p in self.thresholds(model).values())

    def scores(self, model: nn.Module) -> dict[str, Tensor]:
        """|θ| − t per weight, by plain parameter name (higher = kept; > 0 iff kept by
        :meth:`finalize`)."""
        return {
            name: original(model, name).detach().abs() - p.threshold().detach()
            for name, p in self.thresholds(model).items()
        }

    @staticmethod
    def finalize(gated: nn.Module) -> tuple[nn.Module, Masks]:
        """A plain copy of ``gated`` whose weights are θ·1[|θ| > t], and the masks |θ| > t."""

        def rule(p: ThresholdPruning, theta: Tensor) -> tuple[Tensor, Tensor]:
            keep = theta.abs() > p.threshold()
            return theta * keep, keep

        return finalize_gates(gated, ThresholdPruning, "LearnedThreshold.attach", rule)

    def __repr__(self) -> str:
        return f"LearnedThreshold(strength={self.strength:g})"
