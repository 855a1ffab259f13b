"""How a global density is spread over the layers: uniform, Erdős–Rényi and ERK.

Sparse training from scratch fixes each layer's density before training. Mocanu et al. 2018
(SET) give layer l a density proportional to the Erdős–Rényi random-graph rule

    ER:   d_l = ε · (n_in + n_out) / (n_in · n_out)

and Evci et al. 2020 (RigL, "Rigging the Lottery", §3) extend it to convolutions with the
kernel's size (ERK):

    ERK:  d_l = ε · (n_out + n_in + k_h + k_w) / (n_out · n_in · k_h · k_w)
             = ε · Σ shape / Π shape,

with ε the one scale for which Σ_l d_l · N_l = D · Σ_l N_l (N_l the weights of layer l, D the
global density). Small layers get a higher density than large ones. Where ε makes a layer's
density exceed 1, that layer is made dense and ε solved again over the others (the authors'
``get_sparsities_erdos_renyi``: the layers with the largest raw density are made dense one
value at a time until every density fits); layers named dense from the start (the first
layer, for instance) are treated the same way: their weights count at density 1 and the rest
share what is left. ``uniform`` gives every layer D.

For a weight of shape (n_out, n_in, *kernel) (torch's layout for Linear and convolutions), ER
uses the first two dimensions and ERK every dimension; a 1-d weight (an embedding's rows are
2-d) counts as its length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from winnow.core.densities import check_density
from winnow.core.prunable import prunable_parameters

DISTRIBUTIONS = ("uniform", "er", "erk")
"""The layer-wise density distributions :func:`layer_densities` knows."""


def raw_density(shape: tuple[int, ...], distribution: str) -> float:
    """The unscaled density of a layer of ``shape`` under ``distribution`` (ε = 1)."""
    if distribution == "uniform":
        return 1.0
    if distribution == "er":
        dims = shape[:2] if len(shape) >= 2 else shape
        return sum(dims) / math.prod(dims)
    if distribution == "erk":
        return sum(shape) / math.prod(shape)
    raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")


def layer_densities(
    shapes: Mapping[str, tuple[int, ...]] | nn.Module,
    density: float,
    distribution: str = "erk",
    dense: Iterable[str] = (),
    dense_first: bool = False,
) -> dict[str, float]:
    """The density of each layer so that the whole keeps ``density`` of its weights.

    Args:
        shapes: name -> weight shape, or a model (its prunable weights, in order).
        density: the global fraction kept, in [0, 1].
        distribution: ``"uniform"``, ``"er"`` (Erdős–Rényi) or ``"erk"`` (Erdős–Rényi-Kernel).
        dense: names of layers kept dense (their weights count towards the budget).
        dense_first: keep the first layer dense too.

    Returns name -> density in [0, 1]; Σ d_l · N_l = density · Σ N_l exactly (in real
    arithmetic). ``ValueError`` if the dense layers alone exceed the budget.
    """
    check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    if isinstance(shapes, nn.Module):
        shapes = {n: tuple(p.shape) for n, p in prunable_parameters(shapes).items()}
    shapes = {n: tuple(int(s) for s in shape) for n, shape in shapes.items()}
    if not shapes:
        raise ValueError("no layers to give densities to")
    dense_set = set(dense)
    unknown = dense_set - set(shapes)
    if unknown:
        raise ValueError(f"dense layers {sorted(unknown)} are not among {list(shapes)}")
    if dense_first:
        dense_set.add(next(iter(shapes)))
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total_kept = density * sum(sizes.values())
    raw = {n: raw_density(s, distribution) for n, s in shapes.items()}
    while True:
        budget = total_kept - sum(sizes[n] for n in dense_set)
        sparse = [n for n in shapes if n not in dense_set]
        if budget < -1e-9 * sum(sizes.values()):
            raise ValueError(
                f"the dense layers {sorted(dense_set)} alone keep more than density {density}"
            )
        if not sparse:
            break
        divisor = sum(raw[n] * sizes[n] for n in sparse)
        epsilon = max(budget, 0.0) / divisor
        largest = max(raw[n] for n in sparse)
        if epsilon * largest <= 1.0:
            break
        dense_set.update(n for n in sparse if raw[n] == largest)
    return {n: 1.0 if n in dense_set else epsilon * raw[n] for n in shapes}


def layer_counts(densities: Mapping[str, float], sizes: Mapping[str, int]) -> dict[str, int]:
    """Whole numbers of weights kept per layer: round(d_l · N_l), then the largest remainders
    adjusted so that the total is round(Σ d_l · N_l) (so a global budget is met exactly)."""
    exact = {n: densities[n] * sizes[n] for n in densities}
    counts = {n: min(sizes[n], max(0, math.floor(v))) for n, v in exact.items()}
    missing = round(sum(exact.values())) - sum(counts.values())
    by_remainder = sorted(exact, key=lambda n: exact[n] - math.floor(exact[n]), reverse=True)
    for name in by_remainder:
        if missing <= 0:
            break
        if counts[name] < sizes[name]:
            counts[name] += 1
            missing -= 1
    return counts


def sizes_of(params: Mapping[str, Tensor]) -> dict[str, int]:
    """name -> number of elements."""
    return {n: p.numel() for n, p in params.items()}
