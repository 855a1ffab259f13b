"""Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017, "Variational Dropout
Sparsifies Deep Neural Networks", ICML).

Every weight gets a Gaussian posterior q(w) = N(θ, σ²) and the log-uniform prior
p(|w|) ∝ 1/|w|; training maximises the variational lower bound, i.e. minimises

    (1/N) Σ_n CE(x_n, y_n; w ~ q) + KL(q ‖ p) / N,

and weights whose dropout rate α = σ²/θ² is large (log α > 3, i.e. α > e³ ≈ 20: the noise
swamps the weight) are pruned.

- :class:`LinearSVDO` and :class:`Conv2dSVDO` hold θ (``weight``), log σ² (``log_sigma2``) and
  the bias. The *additive reparameterisation* (§4.1 of the paper) makes σ² a parameter of its
  own, independent of θ, which lowers the variance of the gradient; log α = log σ² −
  log(θ² + 1e-8), clipped to [−8, 8] as in the authors' code. In training the *local
  reparameterisation trick* samples the pre-activations: mean = x·θ + b, var = x²·σ², output
  = mean + sqrt(var + 1e-8)·ε with ε ~ N(0, 1). In eval the output is deterministic, with the
  weights whose log α exceeds the layer's ``threshold`` (3) set to 0.
- :func:`neg_kl` is the paper's approximation (Eq. 14) of −KL(q ‖ p) per weight, :func:`kl`
  its sum over a model's SVDO layers and :class:`KLPenalty` the scaled sum to pass as
  ``regularizer`` to :func:`winnow.train`.
- :func:`to_svdo` and :func:`from_svdo` convert a model's Linear / Conv2d layers to and from
  their SVDO versions; :func:`from_svdo` also returns the masks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from winnow.core.masks import Masks
from winnow.core.modules import copy_weight_and_bias, layer_targets, replace_submodule

K1, K2, K3 = 0.63576, 1.87320, 1.48695
"""Constants of the KL approximation, Molchanov et al. 2017, Eq. 14."""

LOG_ALPHA_CLIP = 8.0
THRESHOLD = 3.0
LOG_SIGMA2_INIT = -10.0


def neg_kl(log_alpha: Tensor) -> Tensor:
    """The paper's approximation of −KL(N(θ, αθ²) ‖ log-uniform) per weight (Eq. 14):

        −KL ≈ k1·σ(k2 + k3·log α) − 0.5·log(1 + 1/α) − k1,

    with k1 = 0.63576, k2 = 1.87320, k3 = 1.48695. C = −k1 makes it tend to 0 as α → ∞;
    as α → 0 it behaves like 0.5·log α − k1 → −∞. It increases with log α.
    """
    return K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1


class _SVDO:
    """What :class:`LinearSVDO` and :class:`Conv2dSVDO` share: log α, the KL, the mask."""

    weight: nn.Parameter
    log_sigma2: nn.Parameter
    threshold: float

    def log_alpha(self) -> Tensor:
        """log α = log σ² − log(θ² + 1e-8), clipped to [−8, 8]."""
        log_alpha = self.log_sigma2 - torch.log(self.weight.square() + 1e-8)
        return log_alpha.clamp(-LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)

    def kl(self) -> Tensor:
        """The approximate KL(q ‖ p) of this layer's weights (a sum over them)."""
        return -neg_kl(self.log_alpha()).sum()

    def keep_mask(self, threshold: float | None = None) -> Tensor:
        """The weights kept: log α <= ``threshold`` (default: the layer's)."""
        limit = self.threshold if threshold is None else threshold
        return self.log_alpha().detach() <= limit

    def _init_svdo(self, log_sigma2_init: float, threshold: float) -> None:
        self.threshold = float(threshold)
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight, float(log_sigma2_init)))

    def _eval_weight(self) -> Tensor:
        return self.weight * self.keep_mask()


class LinearSVDO(_SVDO, nn.Linear):
    """A Linear layer with sparse variational dropout (Molchanov et al. 2017).

    Parameters: ``weight`` (θ), ``log_sigma2`` (log σ², same shape, initialised to
    ``log_sigma2_init``) and ``bias``. Training: mean = x·θᵀ + b, var = x²·σ²ᵀ, output = mean
    + sqrt(var + 1e-8)·ε (local reparameterisation). Eval: x·(θ ⊙ 1[log α <= threshold])ᵀ + b.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        log_sigma2_init: float = LOG_SIGMA2_INIT,
        threshold: float = THRESHOLD,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_svdo(log_sigma2_init, threshold)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        log_sigma2_init: float = LOG_SIGMA2_INIT,
        threshold: float = THRESHOLD,
    ) -> LinearSVDO:
        """An SVDO layer with the weights and bias of ``linear`` (copied)."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            log_sigma2_init,
            threshold,
            device=w.device,
            dtype=w.dtype,
        )
        copy_weight_and_bias(layer, linear)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.linear(x, self._eval_weight(), self.bias)
        mean = F.linear(x, self.weight, self.bias)
        var = F.linear(x.square(), self.log_sigma2.exp())
        return mean + (var + 1e-8).sqrt() * torch.randn_like(mean)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold:g}"


class Conv2dSVDO(_SVDO, nn.Conv2d):
    """A Conv2d layer with sparse variational dropout (Molchanov et al. 2017).

    Same parameters and rules as :class:`LinearSVDO`, with convolutions: mean = conv(x, θ) + b,
    var = conv(x², σ²) (with the layer's stride, padding, dilation, groups and padding mode;
    padding x² equals squaring the padded x for every padding mode).
    """

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
        log_sigma2_init: float = LOG_SIGMA2_INIT,
        threshold: float = THRESHOLD,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_svdo(log_sigma2_init, threshold)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        log_sigma2_init: float = LOG_SIGMA2_INIT,
        threshold: float = THRESHOLD,
    ) -> Conv2dSVDO:
        """An SVDO layer with the configuration, weights and bias of ``conv`` (copied)."""
        w = conv.weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            log_sigma2_init,
            threshold,
            device=w.device,
            dtype=w.dtype,
        )
        copy_weight_and_bias(layer, conv)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self._conv_forward(x, self._eval_weight(), self.bias)
        mean = self._conv_forward(x, self.weight, self.bias)
        var = self._conv_forward(x.square(), self.log_sigma2.exp(), None)
        return mean + (var + 1e-8).sqrt() * torch.randn_like(mean)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold:g}"


SVDO_LAYERS = (LinearSVDO, Conv2dSVDO)


def svdo_layers(model: nn.Module) -> dict[str, LinearSVDO | Conv2dSVDO]:
    """The SVDO layers of ``model``, by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDO_LAYERS)}


def kl(model: nn.Module) -> Tensor:
    """Σ over the SVDO layers of ``model`` of the approximate KL(q ‖ p) (see :func:`neg_kl`).

    Unscaled: the variational objective of Molchanov et al. 2017 divides it by the number of
    training examples N when the data term is a mean (see :class:`KLPenalty`).
    """
    layers = svdo_layers(model)
    if not layers:
        raise ValueError("the model has no SVDO layer; convert it with winnow.variational.to_svdo")
    return sum(layer.kl() for layer in layers.values())


class KLPenalty:
    """The KL term of sparse variational dropout as a regulariser for :func:`winnow.train`:

        weight · min(1, (k + 1) / warmup) · KL(q ‖ p),

    where k counts the calls so far (one per training step in :func:`winnow.train`; it is the
    attribute ``step``, which :meth:`reset` sets back to 0). With the training loss a mean
    cross-entropy, ``weight = 1 / N`` (N training examples) gives the paper's lower bound
    divided by N. ``warmup > 0`` raises the KL's weight linearly from 1/warmup to 1 over the
    first ``warmup`` steps (the authors' code anneals it, which helps the network fit the data
    before the noise grows); ``warmup = 0`` uses the full weight from the start.
    """

    def __init__(self, weight: float, warmup: int = 0) -> None:
        if not float(weight) >= 0 or math.isinf(float(weight)):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        if int(warmup) != warmup or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (steps), got {warmup!r}")
        self.weight = float(weight)
        self.warmup = int(warmup)
        self.step = 0

    def factor(self) -> float:
        """The warm-up factor of the next call: min(1, (step + 1) / warmup)."""
        return 1.0 if self.warmup == 0 else min(1.0, (self.step + 1) / self.warmup)

    def reset(self) -> None:
        """Restart the warm-up."""
        self.step = 0

    def __call__(self, model: nn.Module) -> Tensor:
        value = self.weight * self.factor() * kl(model)
        self.step += 1
        return value

    def __repr__(self) -> str:
        return f"KLPenalty(weight={self.weight:g}, warmup={self.warmup}, step={self.step})"


def to_svdo(
    model: nn.Module,
    names: Iterable[str] | None = None,
    log_sigma2_init: float = LOG_SIGMA2_INIT,
    threshold: float = THRESHOLD,
) -> nn.Module:
    """A copy of ``model`` whose Linear and Conv2d layers are SVDO layers; ``model`` is unchanged.

    ``names``: module names to convert (default: every module whose type is exactly
    ``nn.Linear`` or ``nn.Conv2d``). Weights and biases are copied; log σ² starts at
    ``log_sigma2_init`` (−10, as in the authors' code: then log α = −10 − log θ², and only the
    weights below e^(−6.5) ≈ 1.5e-3 in magnitude start above the threshold 3). Parameter names
    stay (``<module>.weight``, ``<module>.bias``), plus ``<module>.log_sigma2``.
    """
    copied = copy.deepcopy(model)
    for name in layer_targets(copied, names, SVDO_LAYERS):
        old = copied.get_submodule(name)
        if isinstance(old, nn.Conv2d):
            new: nn.Module = Conv2dSVDO.from_conv(old, log_sigma2_init, threshold)
        else:
            new = LinearSVDO.from_linear(old, log_sigma2_init, threshold)
        replace_submodule(copied, name, new)
    return copied


def from_svdo(model: nn.Module, threshold: float | None = THRESHOLD) -> tuple[nn.Module, Masks]:
    """A copy of ``model`` with plain Linear / Conv2d layers in place of the SVDO ones, the
    weights with log α > ``threshold`` set to 0, and the masks of the kept weights (keyed
    ``<module>.weight``, the plain model's names). ``threshold=None`` uses each layer's own.

    With the layers' threshold, the plain model in eval mode computes exactly what the SVDO
    model does in eval mode. ``model`` is unchanged.
    """
    layers = svdo_layers(model)
    if not layers:
        raise ValueError("the model has no SVDO layer; convert it with winnow.variational.to_svdo")
    copied = copy.deepcopy(model)
    masks = {}
    for name in layers:
        old = copied.get_submodule(name)
        keep = old.keep_mask(threshold)
        w = old.weight
        if isinstance(old, Conv2dSVDO):
            new: nn.Module = nn.Conv2d(
                old.in_channels,
                old.out_channels,
                old.kernel_size,
                old.stride,
                old.padding,
                old.dilation,
                old.groups,
                old.bias is not None,
                old.padding_mode,
                device=w.device,
                dtype=w.dtype,
            )
        else:
            new = nn.Linear(
                old.in_features,
                old.out_features,
                old.bias is not None,
                device=w.device,
                dtype=w.dtype,
            )
        copy_weight_and_bias(new, old)
        with torch.no_grad():
            new.weight.mul_(keep)
        replace_submodule(copied, name, new)
        masks[f"{name}.weight"] = keep.clone()
    return copied, Masks(masks)
