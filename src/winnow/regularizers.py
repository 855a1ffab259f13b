"""Sparsity-inducing regularisers, added to the loss while training, then a threshold.

Pruning during training (Hoefler et al. 2021, "Sparsity in Deep Learning", §3.6): a penalty
R(θ) added to the loss drives weights (or whole groups) towards zero; afterwards the weights
are thresholded to a target density. Every regulariser here is a small callable object:

    reg = L1(1e-4)
    winnow.train(model, data, config, regularizer=reg)     # loss + reg(model) at every step
    masks = winnow.select(reg.scores(model), density=0.1)   # followed by thresholding

``reg(model)`` returns the scalar ``λ·R`` over the chosen parameters (by default the prunable
weights, :func:`winnow.prunable_parameters`; or an explicit list of names), and
``reg.scores(model)`` returns, by parameter name, the score whose top-k is kept (higher =
kept), e.g. |θ| for L1, the group norm broadcast to the weights for group lasso.

Penalties on the weights themselves: :class:`L1`, :class:`Hoyer` (Hoyer-Square),
:class:`GroupLasso` (filters, channels, neurons) and, on scaling factors (BatchNorm γ),
:class:`Polarization`. Penalties that need something in the forward pass are wrappers that
attach gates to a copy of the model through ``torch.nn.utils.parametrize`` and remove them
with ``finalize``: :class:`L0HardConcrete` (Louizos et al. 2018) and
:class:`LearnedThreshold` (Manessi et al. 2018).

Every penalty is exact at θ = 0: where a norm vanishes its subgradient 0 is used, so no
gradient is NaN.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from winnow.core.masks import Masks, prunable_parameters

GROUPS: dict[str, int] = {"filter": 0, "neuron": 0, "channel": 1}
"""Group name -> the axis a group is a slice of: a filter (convolution) or neuron (Linear) is
an output unit, ``weight[i]``; a channel is an input unit, ``weight[:, j]``."""

POLARIZATION_SCOPES = ("global", "layer")


def _check_strength(strength: float) -> float:
    value = float(strength)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
    return value


def _check_group(group: str) -> int:
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; choose one of {tuple(GROUPS)}")
    return GROUPS[group]


def _names(names: Iterable[str] | None) -> tuple[str, ...] | None:
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
        self.strength = _check_strength(strength)
        self.names = _names(names)

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
        self.axis = _check_group(group)
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
        if scope not in POLARIZATION_SCOPES:
            raise ValueError(f"unknown scope {scope!r}; choose one of {POLARIZATION_SCOPES}")
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


# ---------------------------------------------------------------------------------------------
# Wrappers: parametrisations attached to a copy of the model


def _split(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


def _attach(
    model: nn.Module, names: Iterable[str] | None, make: Callable[[str, Tensor], nn.Module]
) -> nn.Module:
    """A copy of ``model`` with ``make(name, param)`` registered as a parametrisation of each
    chosen parameter (default: the prunable weights)."""
    chosen = list(prunable_parameters(model, _names(names)))
    gated = copy.deepcopy(model)
    for name in chosen:
        module_name, attr = _split(name)
        module = gated.get_submodule(module_name)
        param = getattr(module, attr)
        if parametrize.is_parametrized(module, attr):
            raise ValueError(f"{name!r} is already parametrised")
        parametrize.register_parametrization(module, attr, make(name, param))
    return gated


def _parametrized(model: nn.Module, kind: type[nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """(plain parameter name, parametrisation) for every ``kind`` parametrisation of ``model``."""
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, chain in module.parametrizations.items():
            for p in chain:
                if isinstance(p, kind):
                    yield (f"{module_name}.{attr}" if module_name else attr), p


def _require(model: nn.Module, kind: type[nn.Module], how: str) -> dict[str, nn.Module]:
    found = dict(_parametrized(model, kind))
    if not found:
        raise ValueError(f"the model has no {kind.__name__} gates; attach them with {how}")
    return found


def _original(model: nn.Module, name: str) -> Tensor:
    module_name, attr = _split(name)
    return model.get_submodule(module_name).parametrizations[attr].original


def _finalize(
    gated: nn.Module,
    kind: type[nn.Module],
    how: str,
    rule: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]],
) -> tuple[nn.Module, Masks]:
    """A plain copy of ``gated`` without its ``kind`` parametrisations: ``rule(p, θ)`` gives
    each parameter's final value and keep-mask from the parametrisation and the original θ."""
    found = _require(gated, kind, how)
    plain = copy.deepcopy(gated)
    masks = {}
    with torch.no_grad():
        for name, p in found.items():
            value, keep = rule(p, _original(gated, name).detach())
            module_name, attr = _split(name)
            module = plain.get_submodule(module_name)
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            getattr(module, attr).copy_(value)
            masks[name] = keep.expand_as(value).clone()
    return plain, Masks(masks)


def _gate_shape(weight: Tensor, group: str | None) -> tuple[int, ...]:
    if group is None:
        return tuple(weight.shape)
    axis = _check_group(group)
    if weight.dim() < 2:
        raise ValueError(f"group {group!r} needs a tensor of at least 2 dimensions")
    return tuple(n if d == axis else 1 for d, n in enumerate(weight.shape))


class HardConcreteGate(nn.Module):
    """A parametrisation ``θ ↦ θ ⊙ z`` with hard-concrete gates z (Louizos et al. 2018).

    One parameter ``log_alpha`` per gate (per weight, or per group broadcast over it).
    Training: u ~ U(0, 1), s = σ((log u − log(1 − u) + log α) / β), z = min(1, max(0,
    s(ζ − γ) + γ)), a fresh sample at every forward pass. Eval: z = min(1, max(0,
    σ(log α)(ζ − γ) + γ)). P(z ≠ 0) = σ(log α − β log(−γ/ζ)).
    """

    def __init__(
        self,
        gate_shape: Sequence[int],
        group_size: int,
        init_drop: float = 0.5,
        beta: float = 2 / 3,
        gamma: float = -0.1,
        zeta: float = 1.1,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < init_drop < 1.0:
            raise ValueError(f"init_drop must be in (0, 1), got {init_drop!r}")
        if not (beta > 0 and gamma < 0 and zeta > 1):
            raise ValueError(f"need beta > 0, gamma < 0 < 1 < zeta; got {beta}, {gamma}, {zeta}")
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.group_size = int(group_size)
        # Louizos et al.'s code: log α ~ N(log(1 − p) − log p, 0.01²) for a drop rate p
        mean = math.log(1 - init_drop) - math.log(init_drop)
        init = torch.randn(tuple(gate_shape), generator=generator, dtype=torch.float64)
        dtype = dtype or torch.get_default_dtype()
        self.log_alpha = nn.Parameter((mean + 1e-2 * init).to(dtype=dtype, device=device))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A training-time sample of the gates (differentiable in log α)."""
        eps = torch.finfo(self.log_alpha.dtype).eps
        u = torch.rand(
            self.log_alpha.shape,
            generator=generator,
            dtype=self.log_alpha.dtype,
            device=self.log_alpha.device,
        ).clamp(eps, 1 - eps)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def test_gate(self) -> Tensor:
        """The deterministic test-time gates min(1, max(0, σ(log α)(ζ − γ) + γ))."""
        s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def prob_nonzero(self) -> Tensor:
        """P(z ≠ 0) = 1 − Q(s̄ ≤ 0) = σ(log α − β log(−γ/ζ)), per gate."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def expected_l0(self) -> Tensor:
        """Expected number of non-zero weights: Σ_g |g| · P(z_g ≠ 0)."""
        return self.group_size * self.prob_nonzero().sum()

    def forward(self, weight: Tensor) -> Tensor:
        return weight * (self.sample() if self.training else self.test_gate())

    def extra_repr(self) -> str:
        return (
            f"gates={tuple(self.log_alpha.shape)}, beta={self.beta:.4g}, gamma={self.gamma:g}, "
            f"zeta={self.zeta:g}"
        )


class L0HardConcrete:
    """Expected-L0 penalty with hard-concrete gates (Louizos, Welling & Kingma 2018,
    "Learning Sparse Neural Networks through L0 Regularization", ICLR).

    Each chosen weight tensor θ is replaced in the forward pass by θ ⊙ z, with gates z drawn
    from the hard-concrete distribution (β = 2/3, γ = −0.1, ζ = 1.1 by default; see
    :class:`HardConcreteGate`). The penalty is the expected number of non-zero weights,

        R = Σ_g |g| · σ(log α_g − β log(−γ/ζ)),

    where |g| is the number of weights a gate controls (1 for per-weight gates; the paper's
    group-sparsity form otherwise). ``normalize=False`` returns ``λ · R`` (λ is the cost of
    one weight, as in the paper's Eq. 3); ``normalize=True`` (default) divides R by the
    number of gated weights, so that ``λ · R`` is λ times the expected density, whatever the
    model's size.

    Use :meth:`attach` to gate a copy of a model (the gates live in the copy, under
    ``<module>.parametrizations.<name>.0.log_alpha``; the weights under
    ``<module>.parametrizations.<name>.original``), train it with ``regularizer=`` this
    object, and :meth:`finalize` to get a plain model with θ ⊙ z_test baked in and its masks.
    ``scores`` returns P(z ≠ 0) broadcast to the weights (constant within a group).
    """

    def __init__(self, strength: float = 0.1, normalize: bool = True) -> None:
        self.strength = _check_strength(strength)
        self.normalize = bool(normalize)

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        names: Iterable[str] | None = None,
        init_drop: float = 0.5,
        seed: int = 0,
        *,
        strength: float = 0.1,
        normalize: bool = True,
        group: str | None = None,
        beta: float = 2 / 3,
        gamma: float = -0.1,
        zeta: float = 1.1,
    ) -> tuple[nn.Module, L0HardConcrete]:
        """A gated copy of ``model`` and the penalty to train it with; ``model`` is unchanged.

        ``names``: the parameters to gate (default: the prunable weights). ``group``:
        ``None`` for one gate per weight, or ``"filter"``/``"neuron"``/``"channel"`` for one
        gate per group (see :class:`GroupLasso`). ``init_drop``: the initial drop rate p,
        log α ~ N(log(1 − p) − log p, 0.01²) from a generator seeded with ``seed``.
        """
        reg = cls(strength, normalize)
        generator = torch.Generator().manual_seed(seed)

        def make(name: str, param: Tensor) -> HardConcreteGate:
            shape = _gate_shape(param, group)
            return HardConcreteGate(
                shape,
                param.numel() // math.prod(shape),
                init_drop,
                beta,
                gamma,
                zeta,
                generator=generator,
                dtype=param.dtype,
                device=param.device,
            )

        return _attach(model, names, make), reg

    @staticmethod
    def gates(model: nn.Module) -> dict[str, HardConcreteGate]:
        """The gates of a model made by :meth:`attach`, by the gated parameter's plain name."""
        return _require(model, HardConcreteGate, "L0HardConcrete.attach")

    def __call__(self, model: nn.Module) -> Tensor:
        """``λ · R`` (or ``λ · R / gated weights`` when normalised), a scalar tensor."""
        gates = self.gates(model).values()
        total = sum(g.expected_l0() for g in gates)
        if self.normalize:
            total = total / sum(g.group_size * g.log_alpha.numel() for g in gates)
        return self.strength * total

    def scores(self, model: nn.Module) -> dict[str, Tensor]:
        """P(z ≠ 0) of each weight's gate, by plain parameter name (higher = kept)."""
        return {
            name: g.prob_nonzero().detach().expand_as(_original(model, name)).clone()
            for name, g in self.gates(model).items()
        }

    @staticmethod
    def finalize(gated: nn.Module) -> tuple[nn.Module, Masks]:
        """A plain copy of ``gated`` with θ ⊙ z_test in place of each gated weight, and the
        masks of the non-zero test-time gates (names of the plain model's parameters).

        In eval mode the plain model computes exactly what the gated one does.
        """

        def rule(gate: HardConcreteGate, theta: Tensor) -> tuple[Tensor, Tensor]:
            z = gate.test_gate()
            return theta * z, z > 0

        return _finalize(gated, HardConcreteGate, "L0HardConcrete.attach", rule)

    def __repr__(self) -> str:
        return f"L0HardConcrete(strength={self.strength:g}, normalize={self.normalize})"


L0Gates = L0HardConcrete
"""The name the survey's issue uses for :class:`L0HardConcrete` (``L0Gates.attach(model)``)."""


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
        self.strength = _check_strength(strength)

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

        return _attach(model, names, make), reg

    @staticmethod
    def thresholds(model: nn.Module) -> dict[str, ThresholdPruning]:
        """The pruning functions of a model made by :meth:`attach`, by plain parameter name."""
        return _require(model, ThresholdPruning, "LearnedThreshold.attach")

    def __call__(self, model: nn.Module) -> Tensor:
        """``−λ · Σ_l t_l``, a scalar tensor."""
        return -self.strength * sum(p.threshold() for p in self.thresholds(model).values())

    def scores(self, model: nn.Module) -> dict[str, Tensor]:
        """|θ| − t per weight, by plain parameter name (higher = kept; > 0 iff kept by
        :meth:`finalize`)."""
        return {
            name: _original(model, name).detach().abs() - p.threshold().detach()
            for name, p in self.thresholds(model).items()
        }

    @staticmethod
    def finalize(gated: nn.Module) -> tuple[nn.Module, Masks]:
        """A plain copy of ``gated`` whose weights are θ·1[|θ| > t], and the masks |θ| > t."""

        def rule(p: ThresholdPruning, theta: Tensor) -> tuple[Tensor, Tensor]:
            keep = theta.abs() > p.threshold()
            return theta * keep, keep

        return _finalize(gated, ThresholdPruning, "LearnedThreshold.attach", rule)

    def __repr__(self) -> str:
        return f"LearnedThreshold(strength={self.strength:g})"
