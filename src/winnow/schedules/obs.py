"""One-shot pruning with the Optimal Brain Surgeon update: WoodFisher scores, then the
remaining weights of each block move to compensate for the removed ones.

Hassibi & Stork 1992, "Optimal Brain Surgeon"; Singh & Alistarh 2020, "WoodFisher". The
scores and the block-diagonal inverse of the damped empirical Fisher come from
:mod:`winnow.criteria.fisher`; this is the update rule that uses them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from winnow.core.masks import Masks
from winnow.criteria.fisher import WoodFisherOptions, obs_update, padded
from winnow.criteria.registry import Scoring
from winnow.schedules.density import OneShot
from winnow.schedules.pruner import Pruner


def obs_update_rule(scoring: Scoring, before: Masks | None, after: Masks) -> None:
    """The OBS update as a :class:`~winnow.schedules.Pruner` update rule: in every block of
    the Fisher inverse the WoodFisher criterion scored with (its state), remove the weights
    ``after`` prunes jointly, moving the others by δθ = −F⁻¹[:, Q] ([F⁻¹]_QQ)⁻¹ θ_Q."""
    inverses = getattr(scoring.state, "inverses", None)
    if inverses is None:
        raise ValueError("the OBS update needs the woodfisher criterion's Fisher inverses")
    _apply_obs(scoring.params, after, inverses, scoring.options.block_size)


def obs_prune(
    model: nn.Module,
    density: float,
    data,
    scope: str = "global",
    masks: Masks | None = None,
    samples: int = 1000,
    block_size: int = 128,
    damp: float = 1e-5,
    chunk: int = 100,
    seed: int = 0,
) -> tuple[nn.Module, Masks]:
    """WoodFisher pruning with the OBS update (Singh & Alistarh 2020; Hassibi & Stork 1992).

    Scores the prunable weights by ρ = θ² / (2 [F⁻¹]ᵢᵢ), keeps the top ``density`` (a
    fraction kept; ``scope`` "global" or "layer"; weights pruned in ``masks`` stay pruned),
    and, in every block of the Fisher inverse, removes the pruned weights jointly with
    δθ = −F⁻¹[:, Q] ([F⁻¹]_QQ)⁻¹ θ_Q so the remaining weights compensate. Returns a pruned
    copy of ``model`` (pruned weights exactly 0.0) and its masks; ``model`` is not changed.
    A :class:`~winnow.schedules.Pruner` with a one-shot schedule and :func:`obs_update_rule`.
    """
    pruner = Pruner(
        "woodfisher",
        OneShot(density),
        scope=scope,
        data=data,
        options=WoodFisherOptions(samples, block_size, damp, chunk, seed),
        masks=masks,
        update=obs_update_rule,
    )
    return pruner.pruned(model)


def _apply_obs(
    params: dict[str, nn.Parameter], kept: Masks, inverses: dict[str, Tensor], block_size: int
) -> None:
    """In every block, remove the weights ``kept`` prunes jointly, updating the others."""
    for name, param in params.items():
        theta = padded(param.detach().reshape(1, -1), block_size).to(torch.float64)
        theta = theta.reshape(-1, block_size)
        keep = padded(kept[name].reshape(1, -1).to(torch.uint8), block_size)
        keep = keep.reshape(-1, block_size).bool()
        numel = param.numel()
        real = torch.arange(theta.numel()).reshape(theta.shape) < numel
        for b in range(theta.shape[0]):
            removed = torch.nonzero(~keep[b] & real[b]).flatten()
            if removed.numel():
                theta[b] = obs_update(theta[b], inverses[name][b], removed)
        param.copy_(theta.reshape(-1)[:numel].reshape(param.shape).to(param.dtype))
