"""Pruning at initialisation, one-shot or iterative (SynFlow's schedule).

Score the network, keep the top weights, and repeat with the pruned network over ``rounds``
rounds at the densities d^(k/n).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

from winnow.core import _kernels
from winnow.core._layout import dense_layout, flat_indices, storage_offsets
from winnow.core._parallel import run_balanced
from winnow.core._topk import Survivors
from winnow.core.densities import check_density, exponential_densities
from winnow.core.masks import Masks
from winnow.criteria._registry import lookup, working_copy

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
        _zero(params, removed, survivors.strides)
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
    strides: dict[str, tuple[int, ...]],
) -> None:
    """Zero the weights just pruned, leaving the others untouched: ``removed[name]`` are
    positions in the storage of a tensor laid out with ``strides[name]`` (see
    :meth:`Survivors.select`)."""
    on_cpu = []
    with torch.no_grad():
        for name, where in removed.items():
            if not where.numel():
                continue
            param, stride = params[name], strides[name]
            if not dense_layout(param):
                flat = torch.from_numpy(flat_indices(where.numpy(), param.shape, stride))
                mask = torch.zeros(param.numel(), dtype=torch.bool)
                mask[flat] = True
                param.masked_fill_(mask.view(param.shape).to(param.device), 0)
                continue
            if param.stride() != stride:
                flat = flat_indices(where.numpy(), param.shape, stride)
                where = torch.from_numpy(storage_offsets(flat, param.shape, param.stride()))
            storage = param.detach().as_strided((param.numel(),), (1,))
            bits = _BITS.get(storage.element_size())
            if storage.device.type == "cpu" and bits is not None:  # 0.0 is all zero bits
                job = functools.partial(
                    _kernels.scatter_zero, storage.view(bits).numpy(), where.numpy()
                )
                on_cpu.append((where.numel(), job))
            else:
                storage.index_fill_(0, where.to(param.device, torch.int64), 0)
        run_balanced(on_cpu, 1 << 14)  # each write waits on memory: tensors side by side


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Integer dtypes by width, to write zeros into any float storage (bfloat16 included)."""
