"""Pruning at initialisation, one-shot or iterative (SynFlow's schedule).

Score the network, keep the top weights, and repeat with the pruned network over ``rounds``
rounds at the densities d^(k/n).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor, nn

from winnow.criteria._registry import lookup, working_copy
from winnow.masks import Masks
from winnow.selection import Survivors, check_density, exponential_densities, storage_offsets

DEFAULT_ROUNDS = {"synflow": 100}
"""Rounds used when ``rounds`` is not given (1 for every other criterion)."""


class LayerCollapseWarning(UserWarning):
    """A pruning step left a layer with no weight: in a chain of layers the network can no
    longer pass a signal (an emptied residual shortcut only cuts that path)."""


def prune_at_init(
    model: nn.Module,
    method: str,
    density: float,
    data=None,
    rounds: int | None = None,
    scope: str = "global",
    min_per_layer: int = 0,
    masks: Masks | None = None,
    progress: bool = False,
    **options,
) -> Masks:
    """Masks keeping a fraction ``density`` of the prunable weights, chosen before training.

    Scores the network with the criterion ``method`` (``random``, ``magnitude``, ``snip``,
    ``grasp``, ``synflow``, ...; see :func:`winnow.criteria.score`) and keeps the top weights
    (``scope="global"`` or ``"layer"``). With ``rounds`` > 1 it prunes iteratively: round k
    re-scores the network pruned so far and keeps d^(k/n) of the weights (Tanaka et al. 2020;
    SynFlow defaults to 100 rounds, every other criterion to 1). ``masks`` starts from an
    existing mask instead of the dense network. ``min_per_layer`` keeps at least that many
    weights in every tensor; a layer left empty raises a :class:`LayerCollapseWarning` naming
    it. ``model`` is not changed.

    Args:
        density: the fraction kept, in [0, 1].
        options: passed to the criterion (for example ``samples``, ``temperature``, ``seed``).
    """
    criterion = lookup(method)
    check_density(density)
    if criterion.needs_data and data is None:
        raise ValueError(f"criterion {method!r} needs data")
    rounds = DEFAULT_ROUNDS.get(method, 1) if rounds is None else rounds
    if masks is not None and density > masks.density():
        raise ValueError(
            f"density {density} is above the starting mask's density {masks.density():.4g}"
        )
    start = 1.0 if masks is None else masks.density()
    ratio = density / start if start else 0.0
    targets = [start * d for d in exponential_densities(ratio, rounds)]
    from tqdm.auto import tqdm

    work, params = working_copy(model, list(masks) if masks is not None else None)
    if masks is not None:
        masks.apply(work)
    survivors = Survivors({n: p.shape for n, p in params.items()}, masks)
    for target in tqdm(targets, desc=f"{method}", disable=None if progress else True, leave=False):
        scores = criterion.implementation(work, params, data, **options)
        removed = survivors.select(scores, target, scope=scope, min_per_layer=min_per_layer)
        _zero(params, removed, survivors.removed_offsets)
    masks = survivors.masks({n: p.device for n, p in params.items()})
    collapsed = masks.collapsed_layers()
    if collapsed:
        warnings.warn(
            f"{method} at density {density:.4g} left no weight in {', '.join(collapsed)} "
            "(layer collapse); pass min_per_layer=1 to keep every layer connected",
            LayerCollapseWarning,
            stacklevel=2,
        )
    return masks


def _zero(
    params: dict[str, nn.Parameter],
    removed: dict[str, Tensor],
    offsets: dict[str, tuple[tuple[int, ...], np.ndarray]] | None = None,
) -> None:
    """Zero the weights just pruned (flat indices in the default layout), leaving the others
    untouched; a channels-last weight is written through its storage, at ``offsets[name]``
    when they are given for its stride (see :attr:`Survivors.removed_offsets`)."""
    offsets = offsets or {}
    with torch.no_grad():
        for name, flat in removed.items():
            if flat.numel():
                param = params[name]
                if param.is_contiguous():
                    param.view(-1).index_fill_(0, flat.to(param.device), 0)
                elif param.dim() == 4 and param.is_contiguous(memory_format=torch.channels_last):
                    stride, where = offsets.get(name, (None, None))
                    if stride != param.stride():
                        where = storage_offsets(flat.numpy(), param.shape, param.stride())
                    storage = param.as_strided((param.numel(),), (1,))
                    where = torch.from_numpy(where.astype(np.int64)).to(param.device)
                    storage.index_fill_(0, where, 0)
                else:
                    param.masked_fill_(_flat_mask(flat.to(param.device), param), 0)


def _flat_mask(index: Tensor, like: Tensor) -> Tensor:
    mask = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    mask[index] = True
    return mask.view(like.shape)
