"""Dynamic sparse training: prune *and grow* at a fixed budget (SET, RigL, SNFS-style growth).

A sparse network is trained from scratch with the number of weights of each layer fixed; every
``update_every`` steps a fraction of each layer's active weights is dropped and as many
inactive ones are grown (the survey's "dynamic sparsity", Hoefler et al. 2021 §2.4, §3.8):

- **SET** (Mocanu et al. 2018, "Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science"): drop the smallest magnitudes, grow at
  random.
- **RigL** (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners", Algorithm 1):
  drop the smallest magnitudes, grow where the *dense* gradient of the current batch is
  largest; the dense gradient is computed only at update steps
  (:meth:`winnow.core.enforcement.MaskEnforcer.capture_dense_gradients`).
- **momentum growth** (Dettmers & Zettlemoyer 2019, SNFS): grow where an exponential average of
  the dense gradients is largest. It needs the dense gradient at *every* step (an average of
  masked gradients would be zero where it matters), so its steps cost a copy of the gradients
  more; SNFS's redistribution of weights across layers is not done (the per-layer budget stays
  fixed).

At an update step t < T_end the number changed in a layer with a_l active weights is

    k_l = round(f(t) · a_l),   f(t) = α/2 · (1 + cos(π t / T_end))   (RigL, Eq. 1),

with α = 0.3 and T_end = 75% of training by default. Drop: the k_l active weights of lowest
drop score (magnitude by default; any registered criterion can be named), ties by position.
Grow: the k_l highest grow scores among the weights inactive *after* the drop (a weight just
dropped may be grown back: I_grow = ArgTopK over i ∉ θ \\ I_drop, as in the paper), ties by
position. Grown weights start at 0.0 with zero optimizer state: they were pruned, and
:func:`winnow.enforce` kept them (and their momentum and Adam moments) at exactly zero.

The initial mask is random with each layer's density from a distribution (:mod:`
winnow.core.distributions`: uniform, ER, ERK; first layer dense as an option), or any masks
given. :class:`DynamicSparsity` is a :class:`~winnow.schedules.Pruner`: its schedule
(:class:`DropGrow`) says when it updates, and :func:`winnow.train` drives it like any pruner,
passing the dense gradients it asks for (``needs_gradient``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from winnow.core.densities import check_density
from winnow.core.distributions import DISTRIBUTIONS, layer_counts, layer_densities, sizes_of
from winnow.core.masks import Masks
from winnow.core.prunable import prunable_parameters, unwrap
from winnow.core.ranking import top_by_position
from winnow.schedules.density import Target
from winnow.schedules.pruner import Pruner

GROWTH = ("random", "gradient", "momentum")
"""How :class:`DynamicSparsity` grows: at random (SET), by the dense gradient (RigL), by its
running average (SNFS)."""


def update_fraction(iteration: int, alpha: float, end: int) -> float:
    """RigL's cosine decay of the fraction updated: α/2 · (1 + cos(π t / T_end)) for t < T_end,
    0 from T_end on."""
    if iteration >= end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * iteration / end))


@dataclass(frozen=True)
class DropGrow:
    """When a dynamic sparse training updates, and how much: at every multiple of
    ``update_every`` in (0, end), a fraction :func:`update_fraction` (``alpha`` at t = 0) of
    each layer's active weights. Iteration 0 sets the initial masks."""

    update_every: int = 100
    alpha: float = 0.3
    end: int = 0

    def __post_init__(self) -> None:
        if self.update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {self.update_every}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha (the fraction updated) must be in [0, 1], got {self.alpha}")
        if self.end < 0:
            raise ValueError(f"end must be >= 0, got {self.end}")

    def is_update(self, iteration: int) -> bool:
        return 0 < iteration < self.end and iteration % self.update_every == 0

    def fraction(self, iteration: int) -> float:
        return (
            update_fraction(iteration, self.alpha, self.end) if self.is_update(iteration) else 0.0
        )

    def target(self, iteration: int, current: Masks | None) -> Target | None:
        """The density never changes: only which weights hold it (``None`` between updates)."""
        if iteration == 0 or self.is_update(iteration):
            density = current.layer_density() if current is not None else 1.0
            return Target(density, cumulative=False)
        return None

    def iterations(self) -> list[int]:
        return [0, *range(self.update_every, self.end, self.update_every)]


def drop_and_grow(
    keep: Tensor, drop_scores: Tensor, grow_scores: Tensor, count: int
) -> tuple[Tensor, Tensor]:
    """One layer's update: remove the ``count`` active weights of lowest ``drop_scores`` and add
    the ``count`` weights of highest ``grow_scores`` among those inactive after the removal,
    ties broken by position (the earlier is dropped first and grown first).

    Returns (new keep-mask, grown: weights inactive before and active now). The number kept is
    unchanged. ``ValueError`` on a NaN score."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    flat = keep.reshape(-1)
    count = min(count, int(flat.sum()))
    if count == 0:
        return keep.clone(), torch.zeros_like(keep)
    for what, scores in (("drop", drop_scores), ("grow", grow_scores)):
        if torch.isnan(scores).any():
            raise ValueError(f"the {what} scores hold NaN")
    new = flat.clone()
    active = torch.nonzero(flat).flatten()  # in position order: ties keep their meaning
    drop = drop_scores.reshape(-1)[active].float()
    new[active[top_by_position(-drop, count)]] = False
    grow = grow_scores.reshape(-1).float().masked_fill(new, -math.inf)
    new[top_by_position(grow, count)] = True
    new = new.reshape(keep.shape)
    return new, new & ~keep


def random_masks(
    params: Mapping[str, Tensor], counts: Mapping[str, int], generator: torch.Generator
) -> Masks:
    """Masks keeping exactly ``counts[name]`` weights of each tensor, uniformly at random."""
    masks = {}
    for name, param in params.items():
        keep = torch.zeros(param.numel(), dtype=torch.bool)
        keep[torch.randperm(param.numel(), generator=generator)[: counts[name]]] = True
        masks[name] = keep.reshape(param.shape).to(param.device)
    return Masks(masks)


class DynamicSparsity(Pruner):
    """Sparse training from scratch with drop and grow (SET, RigL, SNFS growth).

    Args:
        density: the global fraction kept, in [0, 1], spread by ``distribution``; or a mapping
            name -> density (then ``distribution`` is not used).
        iterations: the length of training (its optimizer steps); updates stop at
            ``stop · iterations`` (T_end).
        grow: ``"random"`` (SET), ``"gradient"`` (RigL) or ``"momentum"`` (SNFS).
        drop: the criterion whose lowest scores are dropped (``"magnitude"``).
        distribution: ``"uniform"``, ``"er"`` or ``"erk"``.
        dense_first: keep the first layer dense (its weights count towards the budget).
        update_every: ΔT, steps between updates.
        alpha: the fraction of active weights updated at t = 0 (cosine-decayed).
        stop: the fraction of training after which the masks stay fixed.
        momentum: β of the average of gradients for ``grow="momentum"``.
        seed: the seed of the initial random masks and of random growth (each update draws
            from a generator seeded by (seed, iteration): a resumed run grows the same).
        masks: initial masks instead of random ones (e.g. from SNIP).
        names: the parameters to sparsify (default: the prunable weights).

    ``step(iteration, model, gradients=None)``: at 0 the initial masks, at each update the new
    masks (drop and grow), else None. ``grown`` holds the weights grown at the last update.
    """

    def __init__(
        self,
        density: float | Mapping[str, float],
        iterations: int,
        *,
        grow: str = "gradient",
        drop: str = "magnitude",
        distribution: str = "erk",
        dense_first: bool = False,
        update_every: int = 100,
        alpha: float = 0.3,
        stop: float = 0.75,
        momentum: float = 0.9,
        seed: int = 0,
        masks: Masks | None = None,
        names: Iterable[str] | None = None,
    ) -> None:
        if grow not in GROWTH:
            raise ValueError(f"unknown growth {grow!r}; choose one of {GROWTH}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}"
            )
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        if not 0.0 <= stop <= 1.0:
            raise ValueError(f"stop must be in [0, 1] (a fraction of training), got {stop}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if isinstance(density, Mapping):
            for value in density.values():
                check_density(value)
        else:
            check_density(density)
        schedule = DropGrow(update_every, alpha, int(stop * iterations))
        super().__init__(drop, schedule, scope="layer", names=names, masks=masks)
        if self.criterion.needs_data:
            raise ValueError(f"drop criterion {drop!r} needs data; drop by a data-free one")
        self.density, self.grow, self.distribution = density, grow, distribution
        self.dense_first, self.momentum, self.seed = dense_first, momentum, seed
        self.last = -1  # the last iteration stepped (a resumed run does not redo it)
        self.grown: Masks | None = None
        self.average: dict[str, Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"DynamicSparsity({self.density!r}, grow={self.grow!r}, "
            f"distribution={self.distribution!r}, {self.schedule!r})"
        )

    def needs_gradient(self, iteration: int) -> bool:
        """Whether the dense gradient of step ``iteration`` (the step that ends at it) is
        needed: at update steps for RigL, at every step for momentum growth."""
        if self.grow == "momentum":
            return 0 < iteration < self.schedule.end
        return self.grow == "gradient" and self.schedule.is_update(iteration)

    def densities(self, model: nn.Module) -> dict[str, float]:
        """Each layer's density (from the distribution, or as given)."""
        params = prunable_parameters(unwrap(model), self.names)
        if isinstance(self.density, Mapping):
            missing = set(params) - set(self.density)
            if missing:
                raise ValueError(f"no density given for {sorted(missing)}")
            return {n: float(self.density[n]) for n in params}
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        return layer_densities(
            shapes, self.density, self.distribution, dense_first=self.dense_first
        )

    def step(
        self, iteration: int, model: nn.Module, gradients: Mapping[str, Tensor] | None = None
    ) -> Masks | None:
        if iteration <= self.last:
            return None
        self.last = iteration
        if gradients and self.grow == "momentum":
            self._average(gradients)
        if iteration == 0:
            if self.masks is None:
                self.masks = self._initial(model)
            return self.masks
        if self.masks is None:
            raise ValueError("DynamicSparsity is stepped before its initial masks (iteration 0)")
        fraction = self.schedule.fraction(iteration)
        if fraction == 0.0:
            return None
        self.masks, self.grown = self._update(model, fraction, iteration, gradients)
        return self.masks

    def _initial(self, model: nn.Module) -> Masks:
        params = prunable_parameters(unwrap(model), self.names)
        counts = layer_counts(self.densities(model), sizes_of(params))
        generator = torch.Generator().manual_seed(self.seed)
        return random_masks(params, counts, generator)

    @torch.no_grad()
    def _update(
        self, model: nn.Module, fraction: float, iteration: int, gradients
    ) -> tuple[Masks, Masks]:
        drop_scores = self._score_live(model)
        grow_scores = self._grow_scores(iteration, gradients)
        new, grown = {}, {}
        for name, keep in self.masks.items():
            count = round(fraction * int(keep.sum()))
            new[name], grown[name] = drop_and_grow(
                keep, drop_scores[name].to(keep.device), grow_scores[name].to(keep.device), count
            )
        return Masks(new), Masks(grown)

    def _grow_scores(self, iteration: int, gradients) -> dict[str, Tensor]:
        if self.grow == "random":
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
            return {n: torch.rand(m.shape, generator=generator) for n, m in self.masks.items()}
        source = self.average if self.grow == "momentum" else (gradients or {})
        missing = [n for n in self.masks if n not in source]
        if missing:
            raise ValueError(
                f"growth by {self.grow} needs the dense gradients of {missing[:3]} at iteration "
                f"{iteration}: train with winnow.train (it captures them), or pass gradients="
            )
        return {n: source[n].abs() for n in self.masks}

    def _average(self, gradients: Mapping[str, Tensor]) -> None:
        beta = self.momentum
        for name, grad in gradients.items():
            if name in self.average:
                self.average[name].mul_(beta).add_(grad, alpha=1.0 - beta)
            else:
                self.average[name] = grad.detach().clone().mul_(1.0 - beta)

    def pruned(self, model: nn.Module, progress: bool = False):
        raise ValueError(
            "DynamicSparsity changes its masks while the model trains: drive it with "
            "winnow.train(..., pruner=...) or step()"
        )

    # -- resuming ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the masks, the last step and the gradient average."""
        state: dict[str, Any] = {"last": self.last}
        if self.masks is not None:
            state["masks"] = {n: m.cpu() for n, m in self.masks.items()}
        state["average"] = {n: a.cpu() for n, a in self.average.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last = int(state["last"])
        self.masks = Masks(dict(state["masks"])) if "masks" in state else None
        self.average = {n: a.clone() for n, a in state.get("average", {}).items()}


def set_pruner(density: float | Mapping[str, float], iterations: int, **kwargs) -> DynamicSparsity:
    """SET: drop by magnitude, grow at random (Mocanu et al. 2018)."""
    return DynamicSparsity(density, iterations, grow="random", **kwargs)


def rigl_pruner(density: float | Mapping[str, float], iterations: int, **kwargs) -> DynamicSparsity:
    """RigL: drop by magnitude, grow by the dense gradient (Evci et al. 2020)."""
    return DynamicSparsity(density, iterations, grow="gradient", **kwargs)
