"""Iterative magnitude pruning with reset or rewinding: the lottery-ticket procedure.

Frankle & Carbin 2019, "The Lottery Ticket Hypothesis" (ICLR): train the network from θ₀ for
T iterations, prune p% of the remaining weights with the smallest magnitude, reset the
survivors to their initial values θ₀, and repeat. Frankle et al. 2020, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis" (ICML): rewind the survivors to θ_k, their
values at iteration k of the first (dense) training run, instead of θ₀, and train each round
from iteration k with a fresh optimizer and the learning-rate schedule resumed at k.

After R rounds at rate p the density is (1 - p)^R. Round 0 is the dense training run.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from winnow.core.densities import check_sparsity
from winnow.core.masks import Masks
from winnow.core.prunable import prunable_parameters
from winnow.core.selection import select
from winnow.criteria.basic import magnitude_scores
from winnow.inputs import DataSource
from winnow.schedules.density import PruneRate
from winnow.schedules.pruner import Pruner
from winnow.training import TrainConfig, TrainResult, train

State = dict[str, Tensor]


def lottery_rates(
    model: nn.Module,
    rate: float = 0.2,
    conv_rate: float | None = None,
    output_rate: float | None = None,
    names: list[str] | None = None,
) -> dict[str, float]:
    """Per-layer pruning rates (fraction of the remaining weights removed per round).

    Frankle & Carbin 2019's scheme: fully connected layers lose ``rate`` per round (20% for
    LeNet), convolutions ``conv_rate`` (10% for Conv-2/4, 15% for Conv-6; default ``rate``),
    and the output layer ``output_rate`` (default ``rate / 2``, 10% in the paper). The output
    layer is the last prunable tensor in registration order (the classifier in every model of
    the zoo).
    """
    params = prunable_parameters(model, names)
    if not params:
        raise ValueError("the model has no prunable parameter")
    conv_rate = rate if conv_rate is None else conv_rate
    output_rate = rate / 2 if output_rate is None else output_rate
    for value in (rate, conv_rate, output_rate):
        check_sparsity(value)
    rates = {name: (conv_rate if p.dim() > 2 else rate) for name, p in params.items()}
    rates[next(reversed(rates))] = output_rate
    return rates


@torch.no_grad()
def magnitude_prune(
    weights: nn.Module | Mapping[str, Tensor],
    masks: Masks,
    rate: float | Mapping[str, float],
    scope: str = "layer",
) -> Masks:
    """Remove the fraction ``rate`` of the still-kept weights with the smallest |θ|.

    ``rate`` is a sparsity step relative to the weights alive in ``masks`` (0.2: keep 80% of
    them), one number or a mapping name -> rate (per layer, see :func:`lottery_rates`).
    ``scope="layer"`` prunes each tensor by its own rate; ``"global"`` ranks all weights
    together and needs one number. Pruned weights stay pruned; ties are broken by position.
    ``weights`` is a model or a state_dict holding every tensor named in ``masks``. The step
    a :class:`~winnow.schedules.Pruner` with the magnitude criterion and a
    :class:`~winnow.schedules.density.PruneRate` schedule takes.
    """
    if isinstance(weights, nn.Module):
        weights = dict(weights.state_dict(keep_vars=False))
    missing = [n for n in masks if n not in weights]
    if missing:
        raise KeyError(f"no weights for the masked tensors {', '.join(missing)}")
    target = PruneRate(rate, scope).target(0, masks)
    scores = magnitude_scores({n: weights[n] for n in masks})
    return select(scores, target.density, scope, current=masks)


def _state_copy(model: nn.Module) -> State:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train_round(
    model: nn.Module,
    state: Mapping[str, Tensor],
    masks: Masks | None,
    data: DataSource,
    config: TrainConfig,
    start_iteration: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    description: str = "round",
) -> tuple[nn.Module, TrainResult]:
    """Train a copy of ``model`` started from ``state`` under ``masks``; return both.

    One round of a lottery-ticket experiment, and of its controls (the same mask on a fresh
    initialisation; a random mask on the ticket's weights): load ``state`` (θ₀, θ_k or a
    fresh draw), zero and keep zero the pruned weights, train from ``start_iteration`` to the
    end of the schedule. ``model`` itself is not changed. A mask that keeps everything trains
    the dense network without enforcement.
    """
    work = copy.deepcopy(model)
    work.load_state_dict(state)
    if masks is not None and masks.num_kept() == masks.numel():
        masks = None
    result = train(
        work,
        data,
        config,
        masks=masks,
        start_iteration=start_iteration,
        device=device,
        progress=progress,
        description=description,
    )
    return work, result


@dataclass
class LotteryRound:
    """One round of iterative magnitude pruning.

    ``masks`` is the mask this round trained with (all kept in round 0), ``result`` its
    training run, ``trained`` the weights at the end of training (a CPU state_dict),
    ``next_masks`` the mask pruned from them for the next round, and ``rewind_state`` the
    weights every round after the first starts from (θ₀, or θ_k with rewinding).
    """

    round: int
    masks: Masks
    result: TrainResult
    trained: State
    next_masks: Masks
    rewind_state: State


def iterative_magnitude_pruning(
    model: nn.Module,
    data: DataSource,
    config: TrainConfig,
    rounds: int,
    rate: float | Mapping[str, float] = 0.2,
    *,
    scope: str = "layer",
    rewind_iteration: int = 0,
    masks: Masks | None = None,
    rewind_state: Mapping[str, Tensor] | None = None,
    start_round: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Iterator[LotteryRound]:
    """Iterative magnitude pruning (Frankle & Carbin 2019), yielding each round as it ends.

    Round 0 trains the dense ``model`` from its current weights θ₀ for the whole schedule of
    ``config`` and keeps θ_k, its weights after ``rewind_iteration`` = k steps (θ₀ when
    k = 0). Each round r = 1 .. ``rounds`` loads θ_k, applies the mask pruned at the end of
    round r - 1 and trains from iteration k to the end (fresh optimizer, learning rate and
    data order resumed at k; Frankle et al. 2020). Every round then removes the fraction
    ``rate`` of its remaining weights with the smallest trained magnitude (a number, or a
    mapping name -> rate from :func:`lottery_rates`; ``scope`` "layer" or "global", see
    :func:`magnitude_prune`). Density after round r's pruning: (1 - rate)^(r + 1) per layer.

    To resume after round r - 1, pass ``start_round=r``, ``masks`` (the mask round r trains
    with) and ``rewind_state`` (θ_k); the rounds then equal those of an uninterrupted run bit
    for bit. ``model`` is never changed.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not 0 <= start_round <= rounds:
        raise ValueError(f"start_round {start_round} is outside [0, {rounds}]")
    if rewind_iteration < 0:
        raise ValueError(f"rewind_iteration must be >= 0, got {rewind_iteration}")
    if start_round > 0 and (masks is None or rewind_state is None):
        raise ValueError("resuming at a round > 0 needs that round's masks and the rewind state")
    masks = Masks.ones(model) if masks is None else masks
    masks.check_model(model)
    if isinstance(rate, Mapping):
        rates: float | dict[str, float] = dict(rate)
    else:
        check_sparsity(rate)
        rates = lottery_rates(model, rate, conv_rate=rate, output_rate=rate, names=list(masks))
        if scope == "global":
            rates = rate
    pruner = Pruner("magnitude", PruneRate(rates, scope), scope=scope, masks=masks)
    k = rewind_iteration
    init = _state_copy(model)
    rewind = None if rewind_state is None else dict(rewind_state)
    for r in range(start_round, rounds + 1):
        if rewind is None:
            round_config = replace(config, save_at=(*config.save_at, k))
            trained, result = train_round(
                model, init, masks, data, round_config, 0, device, progress, f"round {r}"
            )
            if k not in result.checkpoints:
                raise ValueError(f"rewind iteration {k} is beyond the {result.iterations} steps")
            rewind = result.checkpoints[k]
        else:
            trained, result = train_round(
                model, rewind, masks, data, config, k, device, progress, f"round {r}"
            )
        next_masks = pruner.step(r, trained)
        yield LotteryRound(r, masks, result, _state_copy(trained), next_masks, rewind)
        masks = next_masks
