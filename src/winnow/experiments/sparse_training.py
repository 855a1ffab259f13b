"""Sparse training at equal density and equal training budget: static masks against growth.

The comparison of the RigL paper (Evci et al. 2020, §4) and of the survey's chapter on when
to sparsify (Hoefler et al. 2021, §2.4): every method trains the same model for the same
number of steps and ends at the same density.

- ``static``: a random mask fixed before training, per-layer densities ``uniform`` or ``erk``;
- ``snip``, ``synflow``: masks chosen at initialisation (one global threshold);
- ``set``, ``rigl``: dynamic sparsity from a random mask of the distribution (drop by
  magnitude, grow at random or by the dense gradient; every ``update_every`` steps, cosine-
  decayed fraction ``alpha``, no updates after ``stop`` of training);
- ``gradual``: dense-to-sparse magnitude pruning along Zhu & Gupta's cubic schedule, from
  10% to 75% of training (global scope);
- ``lottery``: the winning ticket of that density (Frankle & Carbin 2019): the run of the
  ``lottery`` experiment with the same model, data, seed and training, global iterative
  magnitude pruning at the rate 1 − 10^(−1/10) ≈ 20.6% per round, whose rounds 10, 13, 17 and
  20 keep 10, 5.01, 2.00 and 1% of the weights (any density is served by its nearest round;
  the record says which). It is run first if the store lacks it (a shared artefact, linked as
  the parent) and serves every density of its seed. Its accuracy is the ticket's training
  at that round; its training FLOPs include the dense training and every pruning round
  before (finding the ticket is most of its cost);
- ``dense``: the reference.

``budget`` multiplies the training length (RigL trained 2× longer). Each run records the final
and early-stopping test accuracy and its **training FLOPs** relative to dense training of the
same length: a step costs 3·f_S (forward, and the two products of the backward pass, on the
sparse weights: Σ_l d_l·M_l with M_l the multiply-adds of layer l per example), a step that
needs the dense gradient (RigL's update steps) 2·f_S + f_D, and a step of gradual pruning
3·f_S at the densities in force at that step; the layers' multiply-adds are measured on the
model with hooks. A run saves its whole training state after every evaluation
(``state.safetensors``) and resumes from it when it was killed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from winnow import inputs, models
from winnow.core.densities import check_density
from winnow.core.distributions import layer_densities
from winnow.core.masks import Masks
from winnow.core.prunable import prunable_parameters
from winnow.experiments import lottery
from winnow.experiments.common import load_data
from winnow.experiments.configs import check_run_seed
from winnow.experiments.lottery import LotteryConfig
from winnow.experiments.registry import Axis, Experiment, register
from winnow.experiments.report import (
    aggregate,
    configuration_groups,
    describe,
    line_plot,
    write_table,
)
from winnow.experiments.store import Run, RunStore
from winnow.options import option, parse_fraction
from winnow.schedules import GradualPruner, OneShot, Pruner, prune_at_init
from winnow.schedules.growth import DynamicSparsity
from winnow.training import Callback, TrainConfig, train

EXPERIMENT = "sparse-training"
METHODS = ("dense", "static", "snip", "synflow", "set", "rigl", "gradual", "lottery")
DISTRIBUTION_METHODS = ("static", "set", "rigl")
DEFAULT_METHODS = ("static", "snip", "synflow", "set", "rigl", "gradual", "lottery")
"""Methods that start from a random mask with per-layer densities of a distribution."""
DISTRIBUTIONS = ("uniform", "erk", "global")
STATE_FILE = "state.safetensors"
LOTTERY_RATE = 1.0 - 10.0**-0.1
"""The per-round rate of the lottery tickets: ten rounds per factor of ten in density."""


def _five_epochs() -> TrainConfig:
    return TrainConfig(epochs=5.0)


@dataclass(frozen=True)
class SparseTrainingConfig:
    """One run: train ``model`` with ``method`` at ``density`` for ``budget`` × the training."""

    model: str = option("lenet300", help="a model of `winnow models`")
    data: str = option("fashion-mnist", help="a dataset of `winnow datasets`")
    method: str = option("rigl", help="how the sparse network is found", choices=METHODS)
    distribution: str = option(
        "uniform", help="per-layer densities of random masks (static, set, rigl); global for "
        "the others", choices=DISTRIBUTIONS,
    )  # fmt: skip
    density: float = option(0.1, help="fraction of the weights kept at the end", fraction=True)
    budget: float = option(1.0, help="training length as a multiple of `train`")
    seed: int = option(0, help="seeds the initialisation, the data order and the masks")
    update_every: int = option(100, help="steps between drop-and-grow (and gradual) updates")
    alpha: float = option(0.3, help="fraction of active weights updated at the first update")
    stop: float = option(0.75, help="fraction of training after which masks are fixed")
    train: TrainConfig = option(factory=_five_epochs, help="how every network is trained")
    data_limit: int | None = option(None, help="keep only the first N examples of each split")
    device: str = option("cpu", help="where to train: cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown distribution {self.distribution!r}; choose one of {DISTRIBUTIONS}"
            )
        if (self.method in DISTRIBUTION_METHODS) == (self.distribution == "global"):
            raise ValueError(
                f"method {self.method!r} takes distribution "
                + ("uniform or erk" if self.method in DISTRIBUTION_METHODS else "global")
            )
        check_density(self.density)
        if not self.budget > 0:
            raise ValueError(f"budget must be > 0, got {self.budget}")
        if self.method == "lottery" and self.budget != 1.0:
            raise ValueError("a lottery ticket trains each round for `train`: its budget is 1")
        if self.model not in models.available():
            raise ValueError(f"unknown model {self.model!r}")
        check_run_seed(self.train)

    def train_config(self, steps_per_epoch: int) -> TrainConfig:
        """This run's training: ``train`` with the run's seed, ``budget`` times as long."""
        total = self.train.total_iterations(steps_per_epoch)
        return replace(
            self.train, seed=self.seed, epochs=None, iterations=round(self.budget * total)
        )


def sweep(
    methods: tuple[str, ...] = DEFAULT_METHODS,
    distributions: tuple[str, ...] = ("uniform", "erk"),
    densities: tuple[float, ...] = (0.1, 0.05, 0.02, 0.01),
    seeds: tuple[int, ...] = (0, 1, 2),
    budgets: tuple[float, ...] = (1.0,),
    **fields,
) -> list[SparseTrainingConfig]:
    """A dense run per seed and budget, then every method × density × seed × budget; methods
    that start from random masks run once per distribution, the others once (global)."""
    configs = [
        SparseTrainingConfig(method="dense", distribution="global", density=1.0, seed=s,
                             budget=b, **fields)
        for b in budgets for s in seeds
    ]  # fmt: skip
    for method in methods:
        shapes = distributions if method in DISTRIBUTION_METHODS else ("global",)
        for distribution in shapes:
            for density in densities:
                for budget in budgets if method != "lottery" else (1.0,):
                    for seed in seeds:
                        configs.append(SparseTrainingConfig(
                            method=method, distribution=distribution, density=density,
                            budget=budget, seed=seed, **fields,
                        ))  # fmt: skip
    return configs


# -- training FLOPs ---------------------------------------------------------------------------
def weight_macs(model: nn.Module, example: object) -> dict[str, int]:
    """Multiply-adds per example of each prunable weight in a forward pass of ``example`` (a
    batch): (output elements per example) · (weights per output channel), for a weight of
    shape (n_out, ...) of a Linear or convolution. Measured with forward hooks."""
    params = prunable_parameters(model)
    owners = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if full in params:
                owners[full] = module
    macs: dict[str, int] = {}
    handles = []
    for full, module in owners.items():
        weight = params[full]

        def hook(mod, args, output, full=full, weight=weight):
            per_example = output.numel() // (output.shape[0] if output.dim() > 1 else 1)
            per_output = weight.numel() // weight.shape[0]
            macs[full] = macs.get(full, 0) + per_example * per_output

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            inputs.call(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return macs


class FlopMeter(Callback):
    """Adds up the training cost of each step from the masks in force (see the module's
    docstring); ``relative`` is the total over dense training of the same length."""

    def __init__(self, macs: dict[str, int], masks_now, needs_gradient=None) -> None:
        self.macs, self.masks_now, self.needs_gradient = macs, masks_now, needs_gradient
        self.dense = float(sum(macs.values()))
        self.total, self.steps = 0.0, 0
        self._seen: Masks | None = None
        self._sparse = self.dense

    def sparse_macs(self) -> float:
        masks = self.masks_now()
        if masks is not self._seen:
            self._seen = masks
            density = {} if masks is None else masks.layer_density()
            self._sparse = sum(m * density.get(n, 1.0) for n, m in self.macs.items())
        return self._sparse

    def after_step(self, iteration: int, model: nn.Module) -> None:
        f_s = self.sparse_macs()
        gradient = self.needs_gradient is not None and self.needs_gradient(iteration)
        self.total += 2 * f_s + self.dense if gradient else 3 * f_s
        self.steps += 1

    @property
    def relative(self) -> float:
        return self.total / (3 * self.dense * self.steps) if self.steps else 1.0


# -- one run ----------------------------------------------------------------------------------
def _pruner(config: SparseTrainingConfig, model: nn.Module, data, total: int):
    """The masks or the pruner of the run's method: (masks, pruner)."""
    if config.method == "dense":
        return None, None
    if config.method in ("snip", "synflow"):
        return prune_at_init(model, config.method, config.density, data).cpu(), None
    if config.method == "gradual":
        step = config.update_every
        begin = max(step, round(0.1 * total) // step * step)
        end = begin + max(1, (round(config.stop * total) - begin) // step) * step
        if end > total:
            raise ValueError(f"training of {total} steps is too short for gradual pruning")
        return None, GradualPruner(1.0 - config.density, begin, end, step)
    densities = layer_densities(model, config.density, config.distribution)
    if config.method == "static":
        generator_seed = {"seed": config.seed}
        return Pruner("random", OneShot(densities), scope="layer", options=generator_seed).prune(
            model
        ).cpu(), None
    grow = "random" if config.method == "set" else "gradient"
    pruner = DynamicSparsity(
        densities, total, grow=grow, update_every=config.update_every, alpha=config.alpha,
        stop=config.stop, seed=config.seed,
    )  # fmt: skip
    return None, pruner


def lottery_config(config: SparseTrainingConfig) -> LotteryConfig:
    """The lottery run whose rounds reach ``config.density`` (global scope, ≈20.6% a round;
    at least 20 rounds, so one run serves 10% down to 1%)."""
    rounds = math.ceil(math.log(max(config.density, 1e-6)) / math.log(1.0 - LOTTERY_RATE) - 0.05)
    return LotteryConfig(
        model=config.model, data=config.data, rounds=max(20, rounds), rate=LOTTERY_RATE,
        scope="global", seed=config.seed, train=config.train, data_limit=config.data_limit,
        device=config.device, keep_weights=False,
    )  # fmt: skip


def execute_lottery(run: Run, config: SparseTrainingConfig) -> None:
    """Record the ticket of the lottery run's round nearest in density (run first if needed)."""
    parent = run.store.ensure(lottery.EXPERIMENT, lottery_config(config), lottery.execute)
    run.link(parent)
    rounds = sorted(parent.completed("round").items())
    step, best = min(rounds, key=lambda item: abs(item[1]["density"] - config.density))
    cost = sum(r["density"] for k, r in rounds if k <= step)  # every training up to it
    run.record(
        "result",
        0,
        {
            "test_acc": best["test_acc"],
            "val_acc": best["val_acc"],
            "early_stop_test_acc": best["early_stop_test_acc"],
            "density_kept": best["density"],
            "layer_density": best["layer_density"],
            "lottery_round": step,
            "iterations": None,
            "train_flops_relative": cost,
            "seconds": best["seconds"],
        },
    )


def execute(run: Run) -> None:
    """Train one configuration (resuming from its saved state after a kill) and record it."""
    config: SparseTrainingConfig = run.config
    if config.method == "lottery":
        execute_lottery(run, config)
        return
    data = load_data(config.data, config.seed, config.data_limit)
    model = models.create_for(config.model, data, seed=config.seed)
    steps_per_epoch = max(1, -(-len(data.y_train) // config.train.batch_size))
    train_config = config.train_config(steps_per_epoch)
    total = train_config.iterations
    masks, pruner = _pruner(config, model, data, total)
    macs = weight_macs(model, data.x_train[:2])
    state = {"masks": masks}

    def masks_now():
        return pruner.masks if pruner is not None else state["masks"]

    meter = FlopMeter(macs, masks_now, getattr(pruner, "needs_gradient", None))
    result = train(
        model, data, train_config, masks=masks, pruner=pruner, device=config.device,
        callbacks=[meter], checkpoint=run.path(STATE_FILE),
    )  # fmt: skip
    best = result.early_stop
    final_masks = result.masks
    run.record(
        "result",
        0,
        {
            "test_acc": result.final["test_acc"],
            "val_acc": result.final["val_acc"],
            "early_stop_test_acc": best["test_acc"],
            "density_kept": final_masks.density() if final_masks is not None else 1.0,
            "layer_density": final_masks.layer_density() if final_masks is not None else {},
            "iterations": total,
            "train_flops_relative": meter.relative if meter.steps == total else None,
            "seconds": result.seconds,
        },
    )


def label(row: dict) -> str:
    """``rigl (erk, 2x)``: a method with its distribution and budget."""
    parts = [] if row["distribution"] == "global" else [row["distribution"]]
    if row.get("budget", 1.0) != 1.0:
        parts.append(f"{row['budget']:g}x")
    return row["method"] + (f" ({', '.join(parts)})" if parts else "")


def report(results: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """The table (mean ± std test accuracy over seeds, training FLOPs) and the accuracy-vs-
    density plot of the sparse-training experiment, from the store at ``results``."""
    store = RunStore(results)
    out = Path(out) if out is not None else Path(results) / EXPERIMENT
    rows = store.records(EXPERIMENT, kind="result")
    if not rows:
        raise ValueError(f"no finished {EXPERIMENT} runs in {results}")
    by, varying = configuration_groups(rows, store.config_keys(EXPERIMENT))
    extra = [
        k for k in varying if k not in ("model", "method", "distribution", "density", "budget")
    ]
    table = aggregate(
        rows, by=by, values=["test_acc", "early_stop_test_acc", "train_flops_relative"]
    )
    table.sort(key=lambda r: (r["model"], -r["density"], label(r), describe(r, extra)))
    for row in table:
        row["method "] = label(row)
        row["density %"] = 100 * row["density"]
        row["test acc %"] = f"{100 * row['test_acc_mean']:.2f} ± {100 * row['test_acc_std']:.2f}"
        row["early-stop acc %"] = (
            f"{100 * row['early_stop_test_acc_mean']:.2f} ± "
            f"{100 * row['early_stop_test_acc_std']:.2f}"
        )
        row["training FLOPs (x dense)"] = row["train_flops_relative_mean"]
    columns = ["model", "density %", "method ", *extra, "test acc %", "early-stop acc %",
               "training FLOPs (x dense)", "n"]  # fmt: skip
    md, csv = write_table(
        table, columns, out.parent / out.name,
        formats={"density %": "{:g}", "training FLOPs (x dense)": "{:.3f}"},
    )  # fmt: skip
    paths = {"table": md, "csv": csv}
    for model in sorted({r["model"] for r in table}):
        series: dict[str, list[tuple[float, float, float]]] = {}
        dense = [r for r in table if r["model"] == model and r["method"] == "dense"]
        for row in table:
            if row["model"] != model or row["method"] == "dense":
                continue
            # "rigl [erk]": its own colour (line_plot dashes "name (variant)" in name's colour)
            shown = label(row).replace(" (", " [").replace(")", "]")
            series.setdefault(shown, []).append(
                (100 * row["density"], 100 * row["test_acc_mean"], 100 * row["test_acc_std"])
            )
        paths[f"accuracy-{model}"] = line_plot(
            {k: sorted(v) for k, v in series.items()},
            out.parent / f"{out.name}-{model}-accuracy.png",
            xlabel="weights remaining (%)",
            ylabel="test accuracy (%)",
            title=f"Sparse training at equal budget: {model} on {rows[0]['data']}",
            logx=True,
            reference=100 * dense[0]["test_acc_mean"] if dense else None,
        )
    return paths


EXPERIMENT_SPEC = register(
    Experiment(
        name=EXPERIMENT,
        help="static masks, SNIP, SynFlow, SET, RigL and gradual pruning at equal density "
        "and training budget",
        config=SparseTrainingConfig,
        axes=(
            Axis(
                "method",
                "methods",
                str,
                DEFAULT_METHODS,
                "methods to compare",
            ),
            Axis(
                "distribution",
                "distributions",
                str,
                ("uniform", "erk"),
                "per-layer densities of the random-mask methods",
            ),
            Axis(
                "density",
                "densities",
                parse_fraction,
                (0.1, 0.05, 0.02, 0.01),
                "fractions of the weights kept (0.1 or 10%)",
            ),
            Axis("seed", "seeds", int, (0, 1, 2), "seeds"),
            Axis("budget", "budgets", float, (1.0,), "training lengths (multiples of --epochs)"),
        ),  # fmt: skip
        sweep=sweep,
        execute=execute,
        report=report,
    )
)
