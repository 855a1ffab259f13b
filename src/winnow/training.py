"""Train and evaluate a model on any data, honouring pruning masks.

One loop serves every method of winnow: it builds the optimizer and learning-rate schedule
from a :class:`TrainConfig`, keeps pruned weights at zero through :func:`winnow.enforce`,
evaluates every ``eval_every`` iterations (loss and accuracy on validation and test), records
the history, saves weights at chosen iterations (for rewinding, Frankle et al. 2020) and is
deterministic under its seed. It reads data in every form of :mod:`winnow.inputs` (a
:class:`~winnow.data.DataSplits`, a pair ``(x, y)``, a DataLoader or a list of tuple or dict
batches), computes any ``loss_fn(model, batch)``, and runs in bf16 or fp16 autocast (with a
gradient scaler for fp16), with gradient accumulation and clipping and optional
``torch.compile``. Nothing forces a user onto it: masks and enforcement work with any loop.

Determinism: on the CPU a run is bit-for-bit repeatable under its seed (data order,
augmentation and dropout follow ``config.seed``). On a GPU the data order and masks are the
same, but cuDNN and atomics-based kernels (scatter, index_add, some convolution backward
algorithms) may differ in the last bits between runs unless the user calls
``torch.use_deterministic_algorithms(True)``; bf16/fp16 runs differ from fp32 ones by design.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from winnow import distributed
from winnow import inputs as batches
from winnow.core.enforcement import enforce
from winnow.core.masks import Masks
from winnow.data import Batches, DataSplits, augmenter
from winnow.devices import resolve_device
from winnow.inputs import DataError, DataSource, LossFunction
from winnow.options import option
from winnow.resumable import capture, load_state, restore_pruner, save_state

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "step", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
ON_NAN = ("stop", "continue")


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite. ``result`` holds the history up to that evaluation
    (the row with the non-finite value included)."""

    def __init__(self, message: str, result: TrainResult) -> None:
        super().__init__(message)
        self.result = result


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
    batch_size: int = option(
        60, help="examples per optimizer step (in a data-parallel run, of all processes together)"
    )
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
    precision: str = option(
        "fp32", help="arithmetic of the forward pass (autocast; fp16 adds a gradient scaler)",
        choices=PRECISIONS,
    )  # fmt: skip
    accumulate: int = option(1, help="batches whose gradients add up to one optimizer step")
    clip_norm: float | None = option(
        None, help="clip the gradients' total L2 norm to this before each step"
    )
    compile: str | None = option(
        None, help="torch.compile backend for the model ('inductor', 'aot_eager'; none: eager)"
    )
    on_nan: str = option(
        "stop", help="when a loss becomes NaN or infinite: stop with an error, or continue",
        choices=ON_NAN,
    )  # fmt: skip

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
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.on_nan not in ON_NAN:
            raise ValueError(f"unknown on_nan {self.on_nan!r}; choose one of {ON_NAN}")
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {self.accumulate}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
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


def evaluate(
    model: nn.Module,
    data: DataSource | Tensor,
    y: Tensor | None = None,
    batch_size: int = 1000,
    *,
    loss_fn: LossFunction | None = None,
) -> tuple[float, float | None]:
    """Mean loss and accuracy of ``model`` on data, in eval mode (restored afterwards).

    ``data`` is any form of :mod:`winnow.inputs` (a DataSplits' test split), or inputs ``x``
    with labels ``y``. The default loss is the cross-entropy summed over examples (tokens for a
    sequence model, ``-100`` ignored) divided by their number, or the model's own ``.loss``
    when the batches carry no labels; with ``loss_fn``, the mean of its values weighted by
    batch size, and no accuracy (None). A NaN loss is returned as NaN.

    Raises:
        DataError: the data holds no example.
    """
    if isinstance(data, DataSplits):
        data = (data.x_test, data.y_test)
    elif y is not None:
        data = (data, y)
    loss, accuracy, n = _evaluate(model, data, batch_size, loss_fn)
    if n == 0:
        raise DataError("no examples to evaluate on (the data is empty)")
    return loss, accuracy


@torch.no_grad()
def _evaluate(
    model: nn.Module, data: DataSource, batch_size: int, loss_fn: LossFunction | None
) -> tuple[float, float | None, int]:
    """(mean loss, accuracy or None, number of examples) of ``model`` on ``data``."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    try:
        total_loss, right, counted, n = 0.0, 0, 0, 0
        for batch in batches.iterate(data, batch_size):
            batch = batches.move(batch, device)
            if loss_fn is not None:
                examples = batches.size(batch)
                total_loss += float(loss_fn(model, batch)) * examples
                n += examples
                continue
            output = batches.call(model, batch)
            y = batches.labels(batch)
            if y is not None and batches.own_loss(output) is None:
                total_loss += float(batches.cross_entropy(batches.logits_of(output), y, "sum"))
                hits, examples = batches.correct(output, batch)
                right, counted, n = right + hits, counted + examples, n + examples
                continue
            # the model's own mean loss (a language model's shifted tokens, for one)
            examples = batches.size(batch)
            total_loss += float(batches.loss_from(output, batch)) * examples
            n += examples
            if y is not None and batches.logits_of(output).dim() == 2:
                hits, examples = batches.correct(output, batch)
                right, counted = right + hits, counted + examples
        if n == 0:
            return math.nan, None, 0
        return total_loss / n, (right / counted if counted else None), n
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


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
    data: DataSource,
    config: TrainConfig,
    masks: Masks | None = None,
    *,
    start_iteration: int = 0,
    loss_fn: LossFunction | None = None,
    regularizer: Callable[[nn.Module], Tensor] | None = None,
    pruner: Pruning | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    callbacks: Sequence[Callback] = (),
    eval_splits: Mapping[str, DataSource] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    description: str = "train",
    checkpoint: str | os.PathLike | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` and return its :class:`TrainResult`.

    - ``data``: a :class:`~winnow.data.DataSplits` (its training split is shuffled per epoch
      by ``config.seed``, its ``augment`` applied; validation and test are evaluated), a pair
      ``(x, y)`` (shuffled likewise), or an iterable of batches, e.g. a DataLoader with workers
      and pinned memory, read pass after pass in its own order (a sampler's ``set_epoch`` is
      called every pass). A budget in ``epochs`` needs an iterable with a length.
    - ``masks``: pruned weights are zeroed and kept at exactly 0.0 throughout (see
      :func:`winnow.enforce`); the hooks are removed before returning.
    - ``start_iteration``: resume a schedule at iteration k (rewinding, Frankle et al. 2020):
      the learning rate and the data order continue from k, with a fresh optimizer; training
      runs until the config's total iterations. For an iterable the first k passes' batches
      are skipped; the order is exactly the uninterrupted one when the iterable's is fixed.
    - ``loss_fn``: ``(model, batch) -> scalar loss`` (default :func:`winnow.inputs.default_loss`:
      cross-entropy of the logits, or the model's own ``.loss``).
    - ``regularizer``: a function of the model whose value is added to the loss
      (L1, group lasso, ...).
    - ``pruner``: pruning during training (a :class:`winnow.schedules.Pruner`, or a function
      ``(iteration, model) -> masks or None``): called before the first step and after every
      step; new masks it returns are enforced from then on. A pruner with an ``end`` (its
      last pruning iteration) must end within the budget. The masks in force at the end are
      ``result.masks``. A pruner with ``needs_gradient(iteration)`` (growth:
      :class:`winnow.schedules.DynamicSparsity`) is given the dense gradients of the steps it
      asks for as ``step(iteration, model, gradients=...)``; the other steps cost as before.
    - ``checkpoint``: a file holding the run's whole state (:mod:`winnow.resumable`), written
      atomically after every evaluation; when it exists at the start, training resumes from
      it with the same records and weights as an uninterrupted run (same arguments needed).
    - ``optimizer``: use this optimizer instead of the one ``config`` names (the config's
      learning-rate schedule still applies to it).
    - ``callbacks``: :class:`Callback` hooks after every step and every evaluation.
    - ``eval_splits``: what to evaluate every ``eval_every`` iterations, name -> data in any
      form (default: the validation and test splits of a DataSplits, nothing otherwise); rows
      get ``<name>_loss`` and ``<name>_acc`` (None for an empty split).
    - Precision, accumulation, clipping and compilation follow ``config``.
    - A NaN or infinite loss (training or evaluation) raises :class:`TrainingDiverged` at the
      evaluation that sees it, its row recorded with the NaN, unless ``config.on_nan`` is
      ``"continue"``.
    - Deterministic: the data order, augmentation and any randomness inside the model
      (dropout) follow ``config.seed``; the caller's global RNG is left untouched.
    - Data-parallel: launched in several processes (``torchrun --nproc-per-node N`` or
      ``winnow train --nproc N``; :mod:`winnow.distributed`), every process calls ``train``
      with the same arguments; the model is wrapped in ``DistributedDataParallel`` on the
      rank's device (``"cuda"`` means ``cuda:LOCAL_RANK``), ``config.batch_size`` is the
      global batch of a step (divisible by the number of processes; each rank computes its
      slice), an iterable needs a ``DistributedSampler``, the masks must be the same on every
      rank, rank 0 evaluates and alone writes ``checkpoint``, and every rank returns the same
      history and weights.

    Raises:
        DataError: the training data is empty or cannot be read.
        DeviceError: ``device`` does not exist here (CUDA asked without CUDA).
        TrainingDiverged: a loss became NaN or infinite (``config.on_nan == "stop"``).
    """
    loop = _Loop(
        model, data, config, masks, start_iteration, loss_fn, regularizer, pruner, optimizer,
        callbacks, eval_splits, resolve_device(device), checkpoint,
    )  # fmt: skip
    return loop.run(progress, description)


class _Stream:
    """The training batches of :func:`train`: step ``s`` of ``config.accumulate`` batches."""

    def __init__(self, data: DataSource, config: TrainConfig) -> None:
        self.accumulate = config.accumulate
        source = batches.split(data)
        if batches.is_pair(source):
            x, y = source
            if len(y) == 0:
                raise DataError("the training split is empty: there is nothing to train on")
            augment = augmenter(data) if isinstance(data, DataSplits) else None
            self.loader: Batches | None = Batches(
                x, y, config.batch_size, shuffle=True, seed=config.seed, augment=augment
            )
            self.source, self.per_pass = None, len(self.loader)
        else:
            if isinstance(source, Tensor) or not isinstance(source, Iterable):
                next(batches.iterate(source))  # raises the DataError that names the form
            self.loader, self.source, self.per_pass = None, source, batches.count(source)
            if self.per_pass == 0:
                raise DataError("the training data holds no batch: there is nothing to train on")
        if config.epochs is not None and self.per_pass is None:
            raise DataError(
                "a budget in epochs needs data with a length (len(); a DataLoader over a "
                "map-style dataset has one): set iterations instead"
            )

    def steps_per_epoch(self) -> int:
        return -(-self.per_pass // self.accumulate) if self.per_pass else 1

    def steps(self, n: int, start: int) -> Iterator[tuple[int, list]]:
        """``(step, [batches])`` for the optimizer steps ``start .. start + n - 1``."""
        k = self.accumulate
        if self.loader is not None and k == 1:
            for step, xb, yb in self.loader.steps(n, start=start):
                yield step, [(xb, yb)]
            return
        if self.loader is not None:
            flat = ((xb, yb) for _, xb, yb in self.loader.steps(n * k, start=start * k))
        else:
            flat = self._passes(start * k)
        for step in range(start, start + n):
            group = [next(flat) for _ in range(k)]
            yield step, group

    def _passes(self, skip: int) -> Iterator[Any]:
        """The iterable's batches pass after pass, from batch ``skip`` of the stream on."""
        epoch = 0
        if self.per_pass:
            epoch, skip = divmod(skip, self.per_pass)
        while True:
            sampler = getattr(self.source, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            empty = True
            for batch in self.source:
                empty = False
                if skip:
                    skip -= 1
                    continue
                yield batch
            if empty:
                raise DataError("the training data yielded no batch")
            epoch += 1


def _default_splits(data: DataSource) -> dict[str, DataSource]:
    if isinstance(data, DataSplits):
        return {"val": (data.x_val, data.y_val), "test": (data.x_test, data.y_test)}
    return {}


class _Loop:
    """One training run of :func:`train`: its optimizer, schedule, enforcement and records."""

    def __init__(
        self, model, data, config, masks, start_iteration, loss_fn, regularizer, pruner,
        optimizer, callbacks, eval_splits, device, checkpoint=None,
    ) -> None:  # fmt: skip
        self.stream = _Stream(data, config)
        self.group = group = distributed.join(device)
        self.shard = group is not None and self.stream.loader is not None
        self.wrapper = None
        if group is None:
            self.model, self.config, self.device = model.to(device), config, device
        else:  # data-parallel: the plain model, stepped through its DDP wrapper
            if self.shard and config.batch_size % group.world:
                raise ValueError(
                    f"batch_size {config.batch_size} is the global batch of a step, shared by "
                    f"the {group.world} processes: it must be divisible by {group.world}"
                )
            device = group.device
            model, self.wrapper = distributed.wrap(model, group)
            self.model, self.config, self.device = model, config, device
        stepped = model if self.wrapper is None else self.wrapper
        self.forward = (
            stepped if config.compile is None else torch.compile(stepped, backend=config.compile)
        )
        # rank 0 evaluates alone, on the plain model (no collective in its forward pass)
        self.evaluated = self.forward if group is None else model
        self.total = config.total_iterations(self.stream.steps_per_epoch())
        if not 0 <= start_iteration <= self.total:
            raise ValueError(f"start_iteration {start_iteration} is outside [0, {self.total}]")
        self.eval_every = config.eval_every or self.stream.steps_per_epoch()
        self.splits = dict(_default_splits(data) if eval_splits is None else eval_splits)
        self.result = TrainResult()
        self.optimizer = optimizer if optimizer is not None else make_optimizer(model, config)
        self.pruner, self.rng = pruner, None
        self.state_path = None if checkpoint is None else Path(checkpoint)
        if self.state_path is not None and self.state_path.exists():
            masks, start_iteration = self.resume(load_state(self.state_path))
        self.start = start_iteration
        total, start = self.total, start_iteration
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(config, start + step, total)
        )
        if group is not None:
            distributed.check_start(
                group, masks, iteration=start_iteration, config=config,
                examples=len(self.stream.loader.x) if self.shard else None,
            )  # fmt: skip
        self.enforcer = enforce(model, masks, self.optimizer) if masks is not None else None
        if pruner is not None and getattr(pruner, "end", 0) > total:
            raise ValueError(
                f"the pruning schedule ends at iteration {pruner.end}, "
                f"after the {total} of training"
            )
        self.prune_step = getattr(pruner, "step", pruner)
        self.needs_gradient = getattr(pruner, "needs_gradient", None)
        self.captured = False  # whether the step just taken kept its dense gradients
        self.loss_fn = batches.loss_of(loss_fn)
        self.regularizer, self.callbacks = regularizer, list(callbacks)
        self.autocast = _autocast(config.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None

    def resume(self, state: dict) -> tuple[Masks | None, int]:
        """Load a saved state into the model, optimizer and pruner; the masks and iteration."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_pruner(self.pruner, state["pruner"])
        self.result.history = list(state["history"])
        self.result.checkpoints = {int(k): dict(v) for k, v in state["saved"].items()}
        self.rng = state["rng"]
        if self.group is not None:  # this rank's generator, saved by rank 0 for every rank
            ranks = state.get("rng_ranks") or []
            if self.group.rank < len(ranks):
                self.rng = ranks[self.group.rank]
            elif not self.group.main:  # none saved for it (fewer processes): seeded afresh
                self.rng = None
        masks = None if state["masks"] is None else Masks(dict(state["masks"]))
        return masks, int(state["iteration"])

    def save_state(self, iteration: int) -> None:
        if self.state_path is None:
            return
        generators = None
        if self.group is not None:  # every rank's generator; rank 0 alone writes
            generators = distributed.gather(torch.get_rng_state())
            if not self.group.main:
                return
        masks = self.enforcer.masks if self.enforcer is not None else None
        state = capture(
            iteration, self.model, self.optimizer, masks, self.pruner, self.result.history,
            self.result.checkpoints,
        )  # fmt: skip
        if generators is not None:
            state["rng_ranks"] = generators
        save_state(self.state_path, state)

    def prune(self, iteration: int) -> None:
        """Ask the pruner for new masks at ``iteration`` and enforce them."""
        if self.prune_step is None:
            return
        if self.needs_gradient is not None:  # growth: the dense gradient of this step
            gradients = self.enforcer.dense_gradients() if self.captured else None
            new = self.prune_step(iteration, self.model, gradients=gradients)
        else:
            new = self.prune_step(iteration, self.model)
        if self.group is not None:  # every rank enforces the same masks (rank 0's)
            new, differ = distributed.settle(self.group, new)
            if differ:
                distributed.warn_settled(differ, iteration)
                if new is not None and hasattr(self.pruner, "masks"):
                    self.pruner.masks = new
        if new is None:
            return
        if self.enforcer is None:
            self.enforcer = enforce(self.model, new, self.optimizer)
        else:
            self.enforcer.update(new)

    def record(self, iteration: int, train_loss: float | None) -> dict:
        """Evaluate every split, append the row to the history, run the callbacks; stop on a
        NaN or infinite loss unless the config says to continue."""
        row = {"iteration": iteration, "train_loss": train_loss}
        if self.group is None or self.group.main:
            for split, data in self.splits.items():
                with self.autocast:
                    loss, acc, n = _evaluate(
                        self.evaluated, data, self.config.eval_batch_size, None
                    )
                row[f"{split}_loss"] = loss if n else None
                row[f"{split}_acc"] = acc if n else None
        if self.group is not None:
            row = distributed.broadcast(row)
        self.result.history.append(row)
        for callback in self.callbacks:
            callback.after_eval(row, self.model)
        bad = [
            k
            for k, v in row.items()
            if k.endswith("_loss") and v is not None and not math.isfinite(v)
        ]
        if bad and self.config.on_nan == "stop":
            raise TrainingDiverged(
                f"training diverged at iteration {iteration}: {', '.join(bad)} = "
                f"{row[bad[0]]} (lower the learning rate, check the data and the weights for "
                "NaN, or set on_nan='continue')",
                self.result,
            )
        return row

    def checkpoint(self, iteration: int) -> None:
        """Keep a CPU copy of the weights at the iterations of ``config.save_at``."""
        if iteration in self.config.save_at:
            self.result.checkpoints[iteration] = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }

    def step(self, group: list) -> Tensor:
        """One optimizer step over a group of batches; returns their mean detached data loss."""
        self.optimizer.zero_grad(set_to_none=True)
        data_loss = torch.zeros((), device=self.device)
        share = 1.0 / len(group)
        for i, batch in enumerate(group):
            if self.group is not None:
                self.data_parallel_backward(batch, data_loss, share, last=i == len(group) - 1)
                continue
            batch = batches.move(batch, self.device)
            with self.autocast:
                loss = self.loss_fn(self.forward, batch)
                data_loss += loss.detach().float()
                if self.regularizer is not None:
                    loss = loss + self.regularizer(self.model)
            if share != 1.0:
                loss = loss * share
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.config.clip_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.enforcer is not None:  # clip the gradient the step will apply
                self.enforcer.mask_gradients()
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.config.clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return data_loss * share if share != 1.0 else data_loss

    def data_parallel_backward(self, batch, data_loss: Tensor, share: float, last: bool) -> None:
        """One batch's forward and backward pass on this rank (its slice of a global batch,
        weighted by its share); DDP all-reduces the gradients at the group's last batch."""
        weight = 1.0
        if self.shard:
            batch, weight = distributed.shard(batch, self.group)
        batch = batches.move(batch, self.device)
        sync = contextlib.nullcontext() if last else self.wrapper.no_sync()
        with sync:
            with self.autocast:
                loss = self.loss_fn(self.forward, batch)
                # summed over the ranks (at the evaluation), the mean loss of the global batch
                data_loss += loss.detach().float() * (weight / self.group.world)
                if weight != 1.0:
                    loss = loss * weight
                if self.regularizer is not None:
                    loss = loss + self.regularizer(self.model)
            if share != 1.0:
                loss = loss * share
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def mean_loss(self, running: Tensor, count: int) -> float | None:
        """The mean training loss of the steps since the last evaluation (over every rank's
        share of the global batches in a data-parallel run)."""
        if not count:
            return None
        if self.group is not None:
            running = distributed.all_sum(running)
        return float(running) / count

    def run(self, progress: bool, description: str) -> TrainResult:
        started = time.perf_counter()
        device, total = self.device, self.total
        main = self.group is None or self.group.main
        bar = _progress_bar(total - self.start, description, progress and main)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                seed = self.config.seed + self.start
                if self.group is not None:
                    seed = distributed.seed_for(seed, self.group.rank)
                torch.manual_seed(seed)
                if self.rng is not None:  # resumed: the generator as it was at the save
                    torch.set_rng_state(self.rng)
                self.model.train()
                self.prune(self.start)
                self.checkpoint(self.start)
                running, count = torch.zeros((), device=device), 0
                for step, group in self.stream.steps(total - self.start, self.start):
                    if self.needs_gradient is not None and self.enforcer is not None:
                        self.captured = self.needs_gradient(step + 1)
                        if self.captured:
                            self.enforcer.capture_dense_gradients()
                    running += self.step(group)
                    count += 1
                    done = step + 1
                    self.prune(done)
                    self.checkpoint(done)
                    for callback in self.callbacks:
                        callback.after_step(done, self.model)
                    if done % self.eval_every == 0 or done == total:
                        row = self.record(done, self.mean_loss(running, count))
                        running, count = torch.zeros((), device=device), 0
                        self.save_state(done)
                        self.model.train()
                        bar.set_postfix(loss=f"{row['train_loss']:.3f}", **_shown(row))
                    bar.update(1)
                history = self.result.history
                if not history or history[-1]["iteration"] != total:
                    self.record(total, self.mean_loss(running, count))
                if self.group is not None:
                    distributed.barrier(self.group)
        finally:
            bar.close()
            if self.enforcer is not None:
                self.enforcer.remove()
                self.result.masks = self.enforcer.masks
            self.result.iterations = total - self.start
            self.result.seconds = time.perf_counter() - started
        return self.result


def _autocast(precision: str, device: torch.device):
    """The autocast context of a precision (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


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
