"""Train and evaluate a model on tensors held in memory, honouring pruning masks.

One loop serves every method of winnow: it builds the optimizer and learning-rate schedule
from a :class:`TrainConfig`, keeps pruned weights at zero through :func:`winnow.enforce`,
evaluates every ``eval_every`` iterations (loss and accuracy on validation and test), records
the history, saves weights at chosen iterations (for rewinding, Frankle et al. 2020) and is
deterministic under its seed. Nothing forces a user onto it: masks and enforcement work with
any loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from winnow.core.enforcement import enforce
from winnow.core.masks import Masks
from winnow.data import Batches, DataSplits
from winnow.options import option

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: budget, optimizer, learning-rate schedule, evaluation and checkpoints.

    Exactly one of ``iterations`` and ``epochs`` sets the budget. ``milestones`` (iterations)
    and ``gamma`` define the "step" schedule; ``warmup`` iterations of linear warm-up precede
    any schedule. ``eval_every`` is in iterations (0: once per epoch). ``save_at`` lists the
    iterations whose weights are kept in the result (0 = before the first step).
    """

    iterations: int | None = option(
        None, help="training budget in optimizer steps (instead of epochs)", exclusive="budget"
    )
    epochs: float | None = option(
        None, help="training budget in passes over the training split", exclusive="budget"
    )
    batch_size: int = option(60, help="examples per optimizer step")
    optimizer: str = option("adam", help="optimizer", choices=OPTIMIZERS)
    lr: float = option(1.2e-3, help="base learning rate")
    momentum: float = option(0.9, help="momentum of SGD")
    nesterov: bool = option(False, help="Nesterov momentum (SGD)")
    weight_decay: float = option(0.0, help="weight decay (L2 for SGD and Adam, decoupled AdamW)")
    lr_schedule: str = option("constant", help="learning-rate schedule", choices=LR_SCHEDULES)
    milestones: tuple[int, ...] = option(
        (), help="iterations at which the step schedule multiplies the rate by gamma"
    )
    gamma: float = option(0.1, help="factor of the step schedule")
    warmup: int = option(0, help="iterations of linear warm-up before any schedule")
    eval_every: int = option(0, help="iterations between evaluations (0: once per epoch)")
    eval_batch_size: int = option(1000, help="examples per evaluation batch")
    save_at: tuple[int, ...] = option((), help="iterations whose weights are kept (rewinding)")
    seed: int = option(0, help="seed of the data order and of randomness in the model")

    def __post_init__(self) -> None:
        if (self.iterations is None) == (self.epochs is None):
            raise ValueError("set exactly one of iterations and epochs")
        if self.iterations is not None and self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.momentum < 0 or self.warmup < 0 or self.eval_every < 0:
            raise ValueError("weight_decay, momentum, warmup and eval_every must be >= 0")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        object.__setattr__(self, "save_at", tuple(sorted({int(s) for s in self.save_at})))

    def total_iterations(self, steps_per_epoch: int) -> int:
        """The budget in iterations for a given number of batches per epoch."""
        if self.iterations is not None:
            return self.iterations
        return int(math.ceil(self.epochs * steps_per_epoch))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What a training run produced.

    ``history`` holds one row per evaluation (iteration, train_loss, val_loss, val_acc,
    test_loss, test_acc); ``checkpoints`` maps an iteration of ``save_at`` to a CPU copy of the
    model's ``state_dict`` at that point; ``masks`` the masks enforced at the end (those
    given, or the last a pruner set; None for dense training); ``final`` is the last evaluation
    row; ``early_stop`` is the row with the lowest validation loss (the lottery-ticket paper's
    early-stopping criterion), or the last row when there is no validation set.
    """

    history: list[dict] = field(default_factory=list)
    checkpoints: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    masks: Masks | None = None
    iterations: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def early_stop(self) -> dict:
        rows = [r for r in self.history if r.get("val_loss") is not None]
        if not rows:
            return self.final
        return min(rows, key=lambda r: r["val_loss"])


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(x, y)``, in eval mode.

    The model's train/eval mode is restored afterwards. Returns ``(nan, nan)`` for empty data.
    """
    if len(x) == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    try:
        total_loss, correct = 0.0, 0
        device = next(model.parameters()).device
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            logits = model(xb)
            total_loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
        return total_loss / len(x), correct / len(x)
    finally:
        model.train(was_training)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config`` over the model's trainable parameters.

    The fused implementation is used where torch has one for the parameters' device (CPU and
    CUDA): on the CPU, torch's default per-tensor Adam is several times slower, and its
    ``sqrt`` is about 8x slower on exact zeros, which a sparse model's state is full of.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": config.momentum, "nesterov": config.nesterov}
    else:
        cls, kwargs = (torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW), {}
    kwargs.update(lr=config.lr, weight_decay=config.weight_decay)
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if fusable and params:
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass
    return cls(params, **kwargs)


def lr_factor(config: TrainConfig, iteration: int, total: int) -> float:
    """Multiplier of the base learning rate at ``iteration`` (0-based) of ``total``."""
    factor = 1.0
    if config.lr_schedule == "step":
        factor = config.gamma ** sum(iteration >= m for m in config.milestones)
    elif config.lr_schedule == "cosine" and total > 0:
        factor = 0.5 * (1 + math.cos(math.pi * min(iteration, total) / total))
    if config.warmup and iteration < config.warmup:
        factor *= (iteration + 1) / config.warmup
    return factor


class Callback:
    """Hooks into :func:`train` (override what you need; each default does nothing).

    ``after_step(iteration, model)`` runs after every optimizer step (and after the pruner),
    with ``iteration`` the number of steps done; ``after_eval(row, model)`` after every
    evaluation, with the history row just recorded (it may add fields to it).
    """

    def after_step(self, iteration: int, model: nn.Module) -> None:
        pass

    def after_eval(self, row: dict, model: nn.Module) -> None:
        pass


Pruning = Callable[[int, nn.Module], "Masks | None"]
"""A pruner as :func:`train` drives it: a :class:`winnow.schedules.Pruner` (its ``step``) or
any function ``(iteration, model) -> new masks or None``."""


def train(
    model: nn.Module,
    data: DataSplits,
    config: TrainConfig,
    masks: Masks | None = None,
    *,
    start_iteration: int = 0,
    regularizer: Callable[[nn.Module], Tensor] | None = None,
    pruner: Pruning | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    callbacks: Sequence[Callback] = (),
    eval_splits: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    description: str = "train",
) -> TrainResult:
    """Train ``model`` in place on ``data`` and return its :class:`TrainResult`.

    - ``masks``: pruned weights are zeroed and kept at exactly 0.0 throughout (see
      :func:`winnow.enforce`); the hooks are removed before returning.
    - ``start_iteration``: resume a schedule at iteration k (rewinding, Frankle et al. 2020):
      the learning rate and the data order continue from k, with a fresh optimizer; training
      runs until the config's total iterations.
    - ``regularizer``: a function of the model whose value is added to the loss
      (L1, group lasso, ...).
    - ``pruner``: pruning during training (a :class:`winnow.schedules.Pruner`, or a function
      ``(iteration, model) -> masks or None``): called before the first step and after every
      step; new masks it returns are enforced from then on. A pruner with an ``end`` (its
      last pruning iteration) must end within the budget. The masks in force at the end are
      ``result.masks``.
    - ``optimizer``: use this optimizer instead of the one ``config`` names (the config's
      learning-rate schedule still applies to it).
    - ``callbacks``: :class:`Callback` hooks after every step and every evaluation.
    - ``eval_splits``: what to evaluate every ``eval_every`` iterations, name -> ``(x, y)``
      (default: the validation and test splits of ``data``); rows get ``<name>_loss`` and
      ``<name>_acc``.
    - Deterministic: the data order and any randomness inside the model (dropout) follow
      ``config.seed``; the caller's global RNG is left untouched.
    """
    loop = _Loop(
        model, data, config, masks, start_iteration, regularizer, pruner, optimizer,
        callbacks, eval_splits, torch.device(device),
    )  # fmt: skip
    return loop.run(progress, description)


class _Loop:
    """One training run of :func:`train`: its optimizer, schedule, enforcement and records."""

    def __init__(
        self, model, data, config, masks, start_iteration, regularizer, pruner, optimizer,
        callbacks, eval_splits, device,
    ) -> None:  # fmt: skip
        if len(data.y_train) == 0:
            raise ValueError("the training split is empty: there is nothing to train on")
        self.model, self.config, self.device = model.to(device), config, device
        self.loader = Batches(
            data.x_train, data.y_train, config.batch_size, shuffle=True, seed=config.seed
        )
        self.total = config.total_iterations(len(self.loader))
        if not 0 <= start_iteration <= self.total:
            raise ValueError(f"start_iteration {start_iteration} is outside [0, {self.total}]")
        self.start = start_iteration
        self.eval_every = config.eval_every or len(self.loader)
        if eval_splits is None:
            eval_splits = {"val": (data.x_val, data.y_val), "test": (data.x_test, data.y_test)}
        self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in eval_splits.items()}
        self.result = TrainResult()
        self.optimizer = optimizer if optimizer is not None else make_optimizer(model, config)
        total, start = self.total, start_iteration
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(config, start + step, total)
        )
        self.enforcer = enforce(model, masks, self.optimizer) if masks is not None else None
        if pruner is not None and getattr(pruner, "end", 0) > total:
            raise ValueError(
                f"the pruning schedule ends at iteration {pruner.end}, "
                f"after the {total} of training"
            )
        self.prune_step = getattr(pruner, "step", pruner)
        self.regularizer, self.callbacks = regularizer, list(callbacks)

    def prune(self, iteration: int) -> None:
        """Ask the pruner for new masks at ``iteration`` and enforce them."""
        if self.prune_step is None:
            return
        new = self.prune_step(iteration, self.model)
        if new is None:
            return
        if self.enforcer is None:
            self.enforcer = enforce(self.model, new, self.optimizer)
        else:
            self.enforcer.update(new)

    def record(self, iteration: int, train_loss: float) -> dict:
        """Evaluate every split, append the row to the history, run the callbacks."""
        row = {"iteration": iteration, "train_loss": train_loss}
        for split, (x, y) in self.splits.items():
            loss, acc = evaluate(self.model, x, y, self.config.eval_batch_size)
            row[f"{split}_loss"] = None if math.isnan(loss) else loss
            row[f"{split}_acc"] = None if math.isnan(acc) else acc
        self.result.history.append(row)
        for callback in self.callbacks:
            callback.after_eval(row, self.model)
        return row

    def checkpoint(self, iteration: int) -> None:
        """Keep a CPU copy of the weights at the iterations of ``config.save_at``."""
        if iteration in self.config.save_at:
            self.result.checkpoints[iteration] = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }

    def step(self, xb: Tensor, yb: Tensor) -> Tensor:
        """One optimizer step on a batch; returns the detached data loss."""
        xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(xb), yb)
        data_loss = loss.detach()
        if self.regularizer is not None:
            loss = loss + self.regularizer(self.model)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return data_loss

    def run(self, progress: bool, description: str) -> TrainResult:
        started = time.perf_counter()
        device, total = self.device, self.total
        bar = _progress_bar(total - self.start, description, progress)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.config.seed + self.start)
                self.model.train()
                self.prune(self.start)
                self.checkpoint(self.start)
                running, count = torch.zeros((), device=device), 0
                for step, xb, yb in self.loader.steps(total - self.start, start=self.start):
                    running += self.step(xb, yb)
                    count += 1
                    done = step + 1
                    self.prune(done)
                    self.checkpoint(done)
                    for callback in self.callbacks:
                        callback.after_step(done, self.model)
                    if done % self.eval_every == 0 or done == total:
                        row = self.record(done, float(running) / count)
                        running, count = torch.zeros((), device=device), 0
                        self.model.train()
                        bar.set_postfix(loss=f"{row['train_loss']:.3f}", **_shown(row))
                    bar.update(1)
                history = self.result.history
                if not history or history[-1]["iteration"] != total:
                    self.record(total, float(running) / count if count else math.nan)
        finally:
            bar.close()
            if self.enforcer is not None:
                self.enforcer.remove()
                self.result.masks = self.enforcer.masks
        self.result.iterations = total - self.start
        self.result.seconds = time.perf_counter() - started
        return self.result


def _shown(row: dict) -> dict[str, str]:
    """The accuracy the progress bar shows: the test split's, else the first one there is."""
    key = "test_acc" if "test_acc" in row else next((k for k in row if k.endswith("_acc")), None)
    return {} if key is None else {"acc": _fmt(row[key])}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: shown only when stderr is a terminal, so logs and CI stay clean
    return tqdm(
        total=total, desc=description, disable=None if enabled else True, leave=False, unit="it"
    )
