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

Penalties on the weights themselves (``penalties``): :class:`L1`, :class:`Hoyer`
(Hoyer-Square), :class:`GroupLasso` (filters, channels, neurons) and, on scaling factors
(BatchNorm γ), :class:`Polarization`. Penalties that need something in the forward pass are
wrappers that attach gates to a copy of the model through ``torch.nn.utils.parametrize`` and
remove them with ``finalize``: :class:`L0HardConcrete` (``hard_concrete``, Louizos et al. 2018)
and :class:`LearnedThreshold` (``threshold``, Manessi et al. 2018).

Every penalty is exact at θ = 0: where a norm vanishes its subgradient 0 is used, so no
gradient is NaN.
"""

from winnow.regularizers.hard_concrete import HardConcreteGate, L0Gates, L0HardConcrete
from winnow.regularizers.penalties import (
    GROUPS,
    L1,
    GroupLasso,
    Hoyer,
    Polarization,
    Regularizer,
    batchnorm_scales,
)
from winnow.regularizers.threshold import LearnedThreshold, ThresholdPruning, pruning_function

__all__ = [
    "GROUPS",
    "L1",
    "GroupLasso",
    "HardConcreteGate",
    "Hoyer",
    "L0Gates",
    "L0HardConcrete",
    "LearnedThreshold",
    "Polarization",
    "Regularizer",
    "ThresholdPruning",
    "batchnorm_scales",
    "pruning_function",
]
