"""L0 regularisation with hard-concrete gates (Louizos, Welling & Kingma 2018)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from winnow.core.masks import Masks
from winnow.regularizers._parametrized import (
    attach,
    finalize_gates,
    gate_shape,
    original,
    require_gates,
)
from winnow.regularizers.penalties import check_strength


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
        self.strength = check_strength(strength)
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
            shape = gate_shape(param, group)
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

        return attach(model, names, make), reg

    @staticmethod
    def gates(model: nn.Module) -> dict[str, HardConcreteGate]:
        """The gates of a model made by :meth:`attach`, by the gated parameter's plain name."""
        return require_gates(model, HardConcreteGate, "L0HardConcrete.attach")

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
            name: g.prob_nonzero().detach().expand_as(original(model, name)).clone()
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

        return finalize_gates(gated, HardConcreteGate, "L0HardConcrete.attach", rule)

    def __repr__(self) -> str:
        return f"L0HardConcrete(strength={self.strength:g}, normalize={self.normalize})"


L0Gates = L0HardConcrete
"""The name the survey's issue uses for :class:`L0HardConcrete` (``L0Gates.attach(model)``)."""
