"""Pruning from Scratch (Wang et al. 2020, "Pruning from Scratch", AAAI).

The structure of a pruned network can be found without pre-training: with the weights W
frozen at their random initialisation, learn one gate λ_c per channel by minimising

    L(λ) = L_CE(f(x; W, λ)) + γ‖λ‖₁ + λ_reg · (mean(|λ|) − r)²

by (sub-)gradient descent, then keep the channels with the largest gates, at the global
threshold where the pruned network's FLOPs meet a budget, and train that structure from a
fresh random initialisation. Defaults follow the authors' code: gates start at 1 and sit after
BatchNorm, before the activation; they are clamped to [0, 1] after every step; Adam, learning
rate 0.01, 10 epochs, batch 128; λ_reg = 0.5, r = 0.2 and γ = 0 (their code uses only the
ratio penalty; set ``l1`` for the ‖λ‖₁ term); the kept gates are those of the epoch with the
best validation accuracy among the epochs whose fraction of non-zero gates is at most r (the
last epoch when none is); in a ResNet basic block only the first convolution is gated. The
pruned network is trained with the "Scratch-B" budget of Liu et al. 2019, "Rethinking the
Value of Network Pruning": as many training FLOPs as the full model's schedule
(:func:`scratch_b_epochs`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from winnow.inputs import DataSource, batches_per_pass, held_out, input_shape_of
from winnow.structured.budget import Structure, threshold_for_budget
from winnow.structured.dependency import ChannelGroup, analyse
from winnow.structured.gates import add_gates, gate_modules
from winnow.structured.surgery import rebuild, shrink, spec_for
from winnow.training import Callback, TrainConfig, train


@dataclass
class GateResult:
    """What :func:`learn_gates` found.

    ``gates`` maps a group name to the kept checkpoint's gate values (CPU); ``history`` holds
    one row per evaluation (``epoch``, ``iteration``, ``train_loss`` (the cross-entropy, without
    the penalty), ``val_loss``, ``val_acc``, ``nonzero``: the
    fraction of non-zero gates, ``mean_gate``); ``chosen`` is the row of the kept checkpoint.
    """

    gates: dict[str, Tensor]
    groups: list[ChannelGroup]
    history: list[dict] = field(default_factory=list)
    chosen: dict = field(default_factory=dict)
    iterations: int = 0
    seconds: float = 0.0


def learn_gates(
    model: nn.Module,
    data: DataSource,
    *,
    input_shape: Sequence[int] | None = None,
    epochs: float | None = 10.0,
    iterations: int | None = None,
    lr: float = 0.01,
    batch_size: int = 128,
    ratio: float = 0.2,
    penalty: float = 0.5,
    l1: float = 0.0,
    include_tied: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> GateResult:
    """Learn channel gates on the frozen random weights of ``model`` (Wang et al. 2020).

    Minimises ``CE + l1·‖λ‖₁ + penalty·(mean|λ| − ratio)²`` over the gates only, with Adam
    (``lr``) on mini-batches of ``batch_size`` drawn by a generator seeded with ``seed``,
    clamping every gate to [0, 1] after each step, for ``epochs`` epochs (or ``iterations``
    steps when given). ``ratio`` is r, the fraction of gates expected to stay non-zero.
    It is :func:`winnow.train` with the penalty as regularizer and a callback that clamps
    the gates. After every epoch it records the validation accuracy (eval mode; the training
    split's first 1,000 examples when there is no validation split) and the fraction of
    non-zero gates, and keeps the gates of the best epoch among those with at most ``ratio``
    non-zero (else the last). The model is not changed: gates go on a copy
    (:func:`add_gates`, which also says which channels are gated); in that copy no weight
    changes, only the BatchNorm running statistics follow the batches, as in the authors' code
    (train mode).
    """
    if epochs is None and iterations is None:
        raise ValueError("set epochs or iterations")
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio is a fraction of gates in [0, 1], got {ratio}")
    gated, groups = add_gates(model, input_shape or input_shape_of(data), include_tied=include_tied)
    if not groups:
        raise ValueError("the model has no channel group to gate")
    for param in gated.parameters():
        param.requires_grad_(False)
    modules = gate_modules(gated)
    weights = [gate.weight for gate in modules.values()]
    for weight in weights:
        weight.requires_grad_(True)
    budget = {"iterations": iterations} if iterations is not None else {"epochs": epochs}
    config = TrainConfig(**budget, batch_size=batch_size, optimizer="adam", lr=lr, seed=seed)
    steps_per_epoch = batches_per_pass(data, batch_size)
    if config.total_iterations(steps_per_epoch or 1) < 1:
        raise ValueError("learning gates needs at least one step")

    def gate_penalty(_: nn.Module) -> Tensor:
        everything = torch.cat(weights)
        loss = penalty * (everything.abs().mean() - ratio) ** 2
        return loss + l1 * everything.abs().sum() if l1 else loss

    recorder = _GateRecorder(modules, weights, steps_per_epoch)
    trained = train(
        gated,
        data,
        config,
        regularizer=gate_penalty,
        optimizer=torch.optim.Adam(weights, lr=lr),  # plain Adam over the gates only
        callbacks=[recorder],
        eval_splits={"val": held_out(data)},
        device=device,
        progress=progress,
        description="gates",
    )
    result = GateResult({}, groups, recorder.history, iterations=trained.iterations)
    eligible = [i for i, row in enumerate(result.history) if row["nonzero"] <= ratio]
    best = (
        max(eligible, key=lambda i: (_quality(result.history[i]), -i))
        if eligible
        else len(result.history) - 1
    )
    result.chosen = dict(result.history[best])
    result.gates = recorder.snapshots[best]
    result.seconds = trained.seconds
    return result


def _quality(row: dict) -> float:
    """Validation accuracy, or minus the loss for a model whose accuracy is not defined."""
    if row.get("val_acc") is not None:
        return row["val_acc"]
    return -row["val_loss"] if row.get("val_loss") is not None else -math.inf


class _GateRecorder(Callback):
    """Keeps the gates in [0, 1] after every step; after every evaluation, records the
    fraction of non-zero gates and keeps a copy of them."""

    def __init__(self, modules: dict, weights: list[Tensor], steps_per_epoch: int | None) -> None:
        self.modules, self.weights, self.steps_per_epoch = modules, weights, steps_per_epoch
        self.history: list[dict] = []
        self.snapshots: list[dict[str, Tensor]] = []

    def after_step(self, iteration: int, model: nn.Module) -> None:
        with torch.no_grad():
            for weight in self.weights:
                weight.clamp_(0, 1)

    def after_eval(self, row: dict, model: nn.Module) -> None:
        values = torch.cat([w.detach() for w in self.weights])
        row["epoch"] = row["iteration"] / self.steps_per_epoch if self.steps_per_epoch else None
        row["nonzero"] = float((values != 0).float().mean())
        row["mean_gate"] = float(values.mean())
        self.history.append(row)
        self.snapshots.append({k: g.weight.detach().cpu().clone() for k, g in self.modules.items()})


def scratch_b_epochs(epochs: float, dense_flops: float, pruned_flops: float) -> float:
    """Epochs for the "Scratch-B" budget (Liu et al. 2019): as many training FLOPs as the dense
    model's ``epochs``, i.e. ``epochs · dense_flops / pruned_flops``."""
    if pruned_flops <= 0:
        raise ValueError("pruned_flops must be > 0")
    return epochs * dense_flops / pruned_flops


@dataclass
class ScratchResult:
    """What :func:`prune_from_scratch` found: the structure, the gates, and the pruned
    architecture's spec (:func:`winnow.structured.rebuild` gives a fresh network to train)."""

    structure: Structure
    gates: GateResult
    spec: dict[str, Any]
    seconds: float


def prune_from_scratch(
    model: str | nn.Module,
    data: DataSource,
    budget: float,
    *,
    seed: int = 0,
    model_options: dict[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    bisections: int = 10,
    tolerance: float = 1e-3,
    round_to: int = 1,
    **gate_options: Any,
) -> ScratchResult:
    """Pruning from Scratch end to end: gates on random weights, then the FLOPs threshold.

    ``model`` is a zoo name (built for ``data`` with ``seed`` and ``model_options``) or a
    freshly initialised module (not changed). ``budget`` is the fraction of the dense FLOPs
    (MACs) to keep. ``gate_options`` go to :func:`learn_gates` (``epochs``, ``lr``,
    ``iterations``, ``ratio``, ...); ``bisections``, ``tolerance`` and ``round_to`` to
    :func:`threshold_for_budget`. The result's ``structure.widths`` are the per-layer widths;
    train ``rebuild(result.spec, seed=...)`` (with ``base=model`` for a custom module) from
    scratch, with :func:`scratch_b_epochs` epochs for the Scratch-B budget.
    """
    started = time.perf_counter()
    spec = None
    if isinstance(model, str):
        spec = spec_for(model, data, **(model_options or {}))
        model = rebuild(spec, seed=seed)
    shape = tuple(input_shape or input_shape_of(data))
    found = learn_gates(model, data, input_shape=shape, seed=seed, **gate_options)
    structure = threshold_for_budget(
        found.gates,
        analyse(model, shape),
        budget,
        bisections=bisections,
        tolerance=tolerance,
        round_to=round_to,
        seed=seed,
    )
    _, pruned_spec = shrink(model, structure.masks, shape, spec)
    return ScratchResult(structure, found, pruned_spec, time.perf_counter() - started)
