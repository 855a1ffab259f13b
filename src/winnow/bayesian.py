"""Structured Bayesian pruning (Neklyudov, Molchanov, Ashukha & Vetrov 2017, "Structured
Bayesian Pruning via Log-Normal Multiplicative Noise", NeurIPS).

Every output neuron of a Linear layer (every output channel of a Conv2d) is multiplied by a
noise θ_i > 0 whose logarithm lives on [a, b] = [−20, 0]:

- prior: log-uniform truncated to [a, b], i.e. log θ ~ U[a, b];
- posterior: log-normal truncated to [a, b], i.e. log θ ~ N(μ_i, σ_i²) truncated to [a, b].

With α = (a − μ)/σ, β = (b − μ)/σ, Z = Φ(β) − Φ(α) (Φ, φ the standard normal CDF and
density), the paper's closed forms (§4 of the paper) are

    KL(q ‖ p) = log(b − a) − log σ − ½·log(2πe) − log Z − (α·φ(α) − β·φ(β)) / (2Z),
    E[θ]      = e^(μ + σ²/2) · D₁ / Z,      D₁ = Φ(β − σ) − Φ(α − σ) = Φ(σ − α) − Φ(σ − β),
    E[θ²]     = e^(2μ + 2σ²) · D₂ / Z,      D₂ = Φ(β − 2σ) − Φ(α − 2σ),
    SNR(θ)    = E[θ] / sqrt(E[θ²] − E[θ]²) = D₁ / sqrt(Z·e^(σ²)·D₂ − D₁²).

(The KL is that of the two distributions of log θ: it does not change under θ = e^(log θ).)
Training minimises (1/N) Σ_n CE(x_n, y_n; θ ~ q) + KL / N; in training θ is sampled by the
truncated normal's inverse CDF, log θ = μ + σ·Φ⁻¹(Φ(α) + u·Z), u ~ U(0, 1); in eval the noise
is its mean E[θ]. Neurons / channels whose SNR is below 1 are removed (the paper's rule).

- :class:`LogNormalNoise` holds μ and log σ of one layer's neurons (μ starts at 0 and log σ at
  −5, as in the authors' code) and computes the KL, E[θ], Var[θ], the SNR and the samples.
  When used, log σ is clipped to [−20, 5] (the authors' code) and μ to [a, b] (the authors'
  code clips it to [−20, 5]): with the mode inside the interval, α ≤ 0 ≤ β, Z stays away from
  0 and no formula reads Φ far in a tail where its differences would cancel; nothing is lost,
  as a posterior concentrated at a bound is reached by shrinking σ. The distribution's
  quantities are computed in float64 from log Φ (``torch.special.log_ndtr``).
- :class:`LinearSBP` and :class:`Conv2dSBP` are Linear / Conv2d layers followed by their noise
  (``<layer>.noise.mu``, ``<layer>.noise.log_sigma``; ``weight`` and ``bias`` keep their names).
- :func:`to_sbp` / :func:`from_sbp` convert a model to and from them; :func:`from_sbp` folds
  E[θ] into the weights, zeroes the removed neurons and returns their :class:`Masks`;
  :func:`kl`, :class:`SBPPenalty` (``regularizer=`` of :func:`winnow.train`) and :func:`snr`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.special import log_ndtr, ndtr, ndtri

from winnow.core.masks import Masks
from winnow.core.modules import copy_weight_and_bias, layer_targets, replace_submodule
from winnow.variational import KLPenalty

LOG_LOWER, LOG_UPPER = -20.0, 0.0
"""The truncation interval [a, b] of log θ (the paper's and the authors' code's)."""

MU_INIT = 0.0
LOG_SIGMA_INIT = -5.0
LOG_SIGMA_CLIP = (-20.0, 5.0)
"""log σ is clipped to this interval when used (the authors' code)."""

THRESHOLD = 1.0
"""Neurons whose SNR is below this are removed."""

_TINY = torch.finfo(torch.float64).tiny
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# --- the truncated log-normal ----------------------------------------------------------------


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 − e^d) for d < 0, accurate near 0 and far from it (Mächler 2012)."""
    d = d.clamp(max=-_TINY)
    return torch.where(
        d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d.clamp(max=-0.5)))
    )


def log_ndtr_diff(x: Tensor, y: Tensor) -> Tensor:
    """log(Φ(x) − Φ(y)) for x > y, from log Φ: log Φ(x) + log(1 − e^(log Φ(y) − log Φ(x))),
    with both arguments negated (Φ(x) − Φ(y) = Φ(−y) − Φ(−x)) where y > 0, so that neither
    tail loses its digits."""
    flip = y > 0
    high = torch.where(flip, -y, x)
    low = torch.where(flip, -x, y)
    log_high = log_ndtr(high)
    return log_high + _log1mexp(log_ndtr(low) - log_high)


# The functions below take any μ and σ; they are accurate (tested to 1e-6 against quadrature)
# for μ in [a, b], where :class:`LogNormalNoise` keeps it. With μ outside [a, b] by thousands
# of σ, the interval lies so far in a tail that their terms cancel in float64.


def _standardised(mu: Tensor, sigma: Tensor, a: float, b: float) -> tuple[Tensor, Tensor]:
    """α = (a − μ)/σ and β = (b − μ)/σ."""
    return (a - mu) / sigma, (b - mu) / sigma


def truncated_kl(mu: Tensor, sigma: Tensor, a: float = LOG_LOWER, b: float = LOG_UPPER) -> Tensor:
    """KL(LogN_[a,b](μ, σ²) ‖ LogU_[a,b]) per element, in closed form:

        log(b − a) − log σ − ½·log(2πe) − log Z − (α·φ(α) − β·φ(β)) / (2Z),

    with φ(t)/Z computed as exp(−t²/2 − ½·log 2π − log Z)."""
    alpha, beta = _standardised(mu, sigma, a, b)
    log_z = log_ndtr_diff(beta, alpha)

    def density_over_z(t: Tensor) -> Tensor:
        return torch.exp(-0.5 * t.square() - _HALF_LOG_2PI - log_z)

    tails = alpha * density_over_z(alpha) - beta * density_over_z(beta)
    return (
        math.log(b - a) - torch.log(sigma) - 0.5 * math.log(2 * math.pi * math.e) - log_z
        - 0.5 * tails
    )  # fmt: skip


def truncated_log_moments(
    mu: Tensor, sigma: Tensor, a: float = LOG_LOWER, b: float = LOG_UPPER
) -> tuple[Tensor, Tensor]:
    """log E[θ] and r = log(E[θ²] / E[θ]²) ≥ 0 of θ ~ LogN_[a,b](μ, σ²):

        log E[θ] = μ + σ²/2 + log(Φ(β − σ) − Φ(α − σ)) − log Z,
        r        = σ² + log(Φ(β − 2σ) − Φ(α − 2σ)) − 2·log(Φ(β − σ) − Φ(α − σ)) + log Z

    (r without μ, so a small σ keeps its digits); Var[θ] = E[θ]²·(eʳ − 1)."""
    alpha, beta = _standardised(mu, sigma, a, b)
    log_z = log_ndtr_diff(beta, alpha)
    first = log_ndtr_diff(beta - sigma, alpha - sigma)
    second = log_ndtr_diff(beta - 2 * sigma, alpha - 2 * sigma)
    log_mean = mu + 0.5 * sigma.square() + first - log_z
    ratio = sigma.square() + second - 2 * first + log_z
    return log_mean, ratio.clamp(min=_TINY)


def truncated_mean(mu: Tensor, sigma: Tensor, a: float = LOG_LOWER, b: float = LOG_UPPER) -> Tensor:
    """E[θ] = e^(μ + σ²/2)·(Φ(β − σ) − Φ(α − σ)) / Z."""
    return truncated_log_moments(mu, sigma, a, b)[0].exp()


def truncated_variance(
    mu: Tensor, sigma: Tensor, a: float = LOG_LOWER, b: float = LOG_UPPER
) -> Tensor:
    """Var[θ] = E[θ²] − E[θ]² = E[θ]²·(eʳ − 1) (see :func:`truncated_log_moments`)."""
    log_mean, ratio = truncated_log_moments(mu, sigma, a, b)
    return torch.exp(2 * log_mean) * torch.expm1(ratio)


def truncated_snr(mu: Tensor, sigma: Tensor, a: float = LOG_LOWER, b: float = LOG_UPPER) -> Tensor:
    """SNR(θ) = E[θ] / sqrt(Var[θ]) = 1 / sqrt(eʳ − 1): the paper's closed form, divided
    through by E[θ]."""
    return torch.expm1(truncated_log_moments(mu, sigma, a, b)[1]).rsqrt()


def sample_log_truncated(
    mu: Tensor,
    sigma: Tensor,
    a: float = LOG_LOWER,
    b: float = LOG_UPPER,
    uniform: Tensor | None = None,
) -> Tensor:
    """log θ = μ + σ·Φ⁻¹(Φ(α) + u·Z), u ~ U(0, 1) (``uniform``, broadcast against μ; drawn when
    None): the inverse-CDF sample of N(μ, σ²) truncated to [a, b], differentiable in μ and σ.

    Where the interval lies above μ (α > 0) the sample is drawn from the mirrored interval
    [−β, −α] and negated, so Φ is always read in its lower tail where float64 keeps its
    digits; the argument of Φ⁻¹ is kept in [tiny, 1 − 2⁻⁵³] and the result clamped to [a, b].
    """
    if uniform is None:
        uniform = torch.rand_like(mu)
    alpha, beta = _standardised(mu, sigma, a, b)
    mirrored = alpha > 0
    low = torch.where(mirrored, -beta, alpha)
    high = torch.where(mirrored, -alpha, beta)
    cdf_low = ndtr(low)
    p = cdf_low + uniform * (ndtr(high) - cdf_low)
    z = ndtri(p.clamp(_TINY, 1 - 2**-53))
    z = torch.where(mirrored, -z, z)
    return (mu + sigma * z).clamp(a, b)


# --- the noise and the layers ----------------------------------------------------------------


class LogNormalNoise(nn.Module):
    """Multiplicative noise θ ~ LogN_[a,b](μ_i, σ_i²) on ``num_features`` neurons / channels.

    ``dim`` is the features' dimension of the input counted from the end (−1: the last, as
    after a Linear layer; −3: the channels of a Conv2d output (N, C, H, W) or (C, H, W)).
    Training: x·θ with one θ per feature for every position of the dimensions before ``dim``
    (each example and each token after a Linear; each example after a Conv2d), shared across
    the dimensions after it (a channel's spatial positions). Eval: x·E[θ].
    """

    def __init__(
        self,
        num_features: int,
        dim: int = -1,
        mu_init: float = MU_INIT,
        log_sigma_init: float = LOG_SIGMA_INIT,
        a: float = LOG_LOWER,
        b: float = LOG_UPPER,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not a < b:
            raise ValueError(f"need a < b for the truncation interval, got a={a}, b={b}")
        if dim >= 0:
            raise ValueError(f"dim counts from the end (-1, -3, ...), got {dim}")
        self.num_features, self.dim, self.a, self.b = int(num_features), int(dim), a, b
        kwargs = {"device": device, "dtype": dtype}
        self.mu = nn.Parameter(torch.full((num_features,), float(mu_init), **kwargs))
        self.log_sigma = nn.Parameter(torch.full((num_features,), float(log_sigma_init), **kwargs))

    def params(self) -> tuple[Tensor, Tensor]:
        """μ clipped to [a, b] and σ = exp(log σ clipped to [−20, 5]), in float64."""
        mu = self.mu.double().clamp(self.a, self.b)
        return mu, self.log_sigma.double().clamp(*LOG_SIGMA_CLIP).exp()

    def kl(self) -> Tensor:
        """Σ over the features of KL(q(θ_i) ‖ p(θ_i)) (:func:`truncated_kl`), in float64."""
        return truncated_kl(*self.params(), self.a, self.b).sum()

    def mean(self) -> Tensor:
        """E[θ] per feature (float64)."""
        return truncated_mean(*self.params(), self.a, self.b)

    def variance(self) -> Tensor:
        """Var[θ] per feature (float64)."""
        return truncated_variance(*self.params(), self.a, self.b)

    def snr(self) -> Tensor:
        """E[θ] / sqrt(Var[θ]) per feature (float64)."""
        return truncated_snr(*self.params(), self.a, self.b)

    def keep_mask(self, threshold: float = THRESHOLD) -> Tensor:
        """The features kept: SNR >= ``threshold``."""
        return self.snr().detach() >= threshold

    def sample(self, shape: tuple[int, ...]) -> Tensor:
        """θ of the given shape (its last dimension the features'), float64."""
        mu, sigma = self.params()
        uniform = torch.rand(shape, dtype=torch.float64, device=mu.device)
        return sample_log_truncated(mu, sigma, self.a, self.b, uniform).exp()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < -self.dim or x.shape[self.dim] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} features at dimension {self.dim}, "
                f"got an input of shape {tuple(x.shape)}"
            )
        if self.training:
            theta = self.sample((*x.shape[: x.dim() + self.dim], self.num_features))
        else:
            theta = self.mean()
        trailing = [1] * (-self.dim - 1)  # the dimensions after the features share θ
        return x * theta.reshape(*theta.shape, *trailing).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, dim={self.dim}, a={self.a:g}, b={self.b:g}"


class LinearSBP(nn.Linear):
    """A Linear layer whose outputs are multiplied by :class:`LogNormalNoise` (``noise``):
    y = (x·Wᵀ + b) ⊙ θ, θ sampled in training and E[θ] in eval."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mu_init: float = MU_INIT,
        log_sigma_init: float = LOG_SIGMA_INIT,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.noise = LogNormalNoise(
            out_features, -1, mu_init, log_sigma_init, device=device, dtype=dtype
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mu_init: float = MU_INIT, log_sigma_init: float = LOG_SIGMA_INIT
    ) -> LinearSBP:
        """An SBP layer with the weights and bias of ``linear`` (copied)."""
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, mu_init,
            log_sigma_init, device=w.device, dtype=w.dtype,
        )  # fmt: skip
        copy_weight_and_bias(layer, linear)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.noise(F.linear(x, self.weight, self.bias))


class Conv2dSBP(nn.Conv2d):
    """A Conv2d layer whose output channels are multiplied by :class:`LogNormalNoise`
    (``noise``, one θ per example and channel, shared over the positions)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | str | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        mu_init: float = MU_INIT,
        log_sigma_init: float = LOG_SIGMA_INIT,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        self.noise = LogNormalNoise(
            out_channels, -3, mu_init, log_sigma_init, device=device, dtype=dtype
        )

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, mu_init: float = MU_INIT, log_sigma_init: float = LOG_SIGMA_INIT
    ) -> Conv2dSBP:
        """An SBP layer with the configuration, weights and bias of ``conv`` (copied)."""
        w = conv.weight
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, mu_init,
            log_sigma_init, device=w.device, dtype=w.dtype,
        )  # fmt: skip
        copy_weight_and_bias(layer, conv)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.noise(self._conv_forward(x, self.weight, self.bias))


SBP_LAYERS = (LinearSBP, Conv2dSBP)


# --- models ----------------------------------------------------------------------------------


def sbp_layers(model: nn.Module) -> dict[str, LinearSBP | Conv2dSBP]:
    """The SBP layers of ``model``, by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SBP_LAYERS)}


def _layers_or_raise(model: nn.Module) -> dict[str, LinearSBP | Conv2dSBP]:
    layers = sbp_layers(model)
    if not layers:
        raise ValueError("the model has no SBP layer; convert it with winnow.bayesian.to_sbp")
    return layers


def kl(model: nn.Module) -> Tensor:
    """Σ over the SBP layers' neurons / channels of KL(q(θ) ‖ p(θ)), in the dtype of the
    first layer's weights. Unscaled: the paper's objective divides it by the number of
    training examples N when the data term is a mean (see :class:`SBPPenalty`)."""
    layers = _layers_or_raise(model)
    total = sum(layer.noise.kl() for layer in layers.values())
    return total.to(next(iter(layers.values())).weight.dtype)


class SBPPenalty(KLPenalty):
    """The KL term of structured Bayesian pruning as a regulariser for :func:`winnow.train`:

        weight · min(1, (k + 1) / warmup) · KL(q ‖ p),

    k counting the calls (as :class:`winnow.variational.KLPenalty`, whose warm-up it shares).
    With a mean cross-entropy as the training loss, ``weight = 1 / N`` gives the paper's
    evidence lower bound divided by N.
    """

    def __call__(self, model: nn.Module) -> Tensor:
        value = self.weight * self.factor() * kl(model)
        self.step += 1
        return value

    def __repr__(self) -> str:
        return f"SBPPenalty(weight={self.weight:g}, warmup={self.warmup}, step={self.step})"


def snr(model: nn.Module) -> dict[str, Tensor]:
    """The SNR of every neuron / channel of each SBP layer of ``model``, by module name."""
    return {name: layer.noise.snr().detach() for name, layer in _layers_or_raise(model).items()}


def to_sbp(
    model: nn.Module,
    names: Iterable[str] | None = None,
    mu_init: float = MU_INIT,
    log_sigma_init: float = LOG_SIGMA_INIT,
) -> nn.Module:
    """A copy of ``model`` whose Linear and Conv2d layers are SBP layers; ``model`` is unchanged.

    ``names``: module names to convert (default: every module whose type is exactly
    ``nn.Linear`` or ``nn.Conv2d`` except the last one in module order: the paper puts no noise
    on the network's outputs; pass the names to choose). Weights and biases are copied; μ
    starts at ``mu_init`` (0) and log σ at ``log_sigma_init`` (−5), where E[θ] ≈ 0.995: a
    trained network starts close to itself. Parameter names stay, plus
    ``<module>.noise.mu`` and ``<module>.noise.log_sigma``.
    """
    copied = copy.deepcopy(model)
    for name in layer_targets(copied, names, SBP_LAYERS, skip_last=True):
        old = copied.get_submodule(name)
        if isinstance(old, nn.Conv2d):
            new: nn.Module = Conv2dSBP.from_conv(old, mu_init, log_sigma_init)
        else:
            new = LinearSBP.from_linear(old, mu_init, log_sigma_init)
        replace_submodule(copied, name, new)
    return copied


def from_sbp(model: nn.Module, threshold: float = THRESHOLD) -> tuple[nn.Module, Masks]:
    """A copy of ``model`` with plain Linear / Conv2d layers in place of the SBP ones, and the
    masks of the neurons / channels kept (SNR >= ``threshold``; keyed ``<module>.weight``: the
    rows of a Linear weight, the output channels of a Conv2d weight).

    Each plain layer folds the noise's mean into its weights: row (output channel) i of the
    weight and bias i are multiplied by E[θ_i], and set to 0 for a removed neuron. The plain
    model in eval mode thus computes what the SBP model does in eval mode, with the removed
    neurons' outputs 0. The biases of removed neurons are zeroed but not masked (the masks
    cover weights): training the plain model further may bring them back unless they are
    frozen. ``model`` is unchanged.
    """
    layers = _layers_or_raise(model)
    copied = copy.deepcopy(model)
    masks = {}
    for name in layers:
        old = copied.get_submodule(name)
        keep = old.noise.keep_mask(threshold)
        w = old.weight
        if isinstance(old, Conv2dSBP):
            new: nn.Module = nn.Conv2d(
                old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                old.dilation, old.groups, old.bias is not None, old.padding_mode,
                device=w.device, dtype=w.dtype,
            )  # fmt: skip
        else:
            new = nn.Linear(
                old.in_features, old.out_features, old.bias is not None,
                device=w.device, dtype=w.dtype,
            )  # fmt: skip
        copy_weight_and_bias(new, old)
        scale = (old.noise.mean().detach() * keep).to(w.dtype)
        rows = scale.reshape(-1, *([1] * (w.dim() - 1)))
        with torch.no_grad():
            new.weight.mul_(rows)
            if new.bias is not None:
                new.bias.mul_(scale)
        replace_submodule(copied, name, new)
        masks[f"{name}.weight"] = keep.reshape(rows.shape).expand_as(w).clone()
    return copied, Masks(masks)
