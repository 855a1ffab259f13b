"""The Pruning-from-Scratch experiment: methods x FLOPs budgets x seeds, pruned nets trained anew.

Each run finds a structure at a FLOPs budget with one method, then trains that structure from
a fresh random initialisation and measures it (Wang et al. 2020, "Pruning from Scratch"):

- ``scratch``: gates learned on the frozen random weights, global threshold
  (:func:`winnow.structured.learn_gates`, :func:`winnow.structured.threshold_for_budget`);
- ``slimming``: network slimming (Liu et al. 2017), trained with L1 on BatchNorm γ first;
- ``l1-filter``: L1-norm filter pruning (Li et al. 2017) of the trained dense network;
- ``uniform``: one width factor on every layer;
- ``dense``: the unpruned network (budget 1), the reference accuracy and latency.

The pruned networks are trained with the "Scratch-B" budget by default (Liu et al. 2019: as
many training FLOPs as the dense schedule). The dense network trained with and without the
slimming penalty is shared between the runs of one seed (a run of its own in the store,
experiment ``scratch-pretrained``, trained on first use and linked from the runs that use it),
and its training time is the "one full training run" the search costs are compared with; so
are the gates Pruning from Scratch learns on a seed's random network (``scratch-gates``),
which serve every budget. A search costs the
time its shared part took when it was computed, plus the selection. A run stores its
structure (``structure.json``: spec, masks, widths) before training, so an interrupted run
resumes after the search; the trained pruned network is saved as ``pruned.safetensors``
(state dict + spec, see :func:`winnow.structured.save`). :func:`report` rebuilds the table
(accuracy, parameters, FLOPs, measured CPU latency at batch 64, search cost) and the
structure-correlation heatmaps from the store alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from winnow import models
from winnow.experiments.common import load_data
from winnow.experiments.configs import check_run_seed
from winnow.experiments.registry import Axis, Experiment, register
from winnow.experiments.report import (
    aggregate,
    bar_plot,
    configuration_groups,
    describe,
    markdown_table,
    write_table,
)
from winnow.experiments.store import Run, RunStore
from winnow.io import atomic_write_bytes
from winnow.options import option, parse_fraction
from winnow.structured import (
    Structure,
    analyse,
    bn_l1,
    correlation_heatmap,
    l1_filter_structure,
    learn_gates,
    mean_correlation,
    measure_latency,
    rebuild,
    save,
    scratch_b_epochs,
    shrink,
    slimming_structure,
    spec_for,
    structure_correlation,
    threshold_for_budget,
    uniform_structure,
)
from winnow.training import TrainConfig, train

EXPERIMENT = "scratch"
METHODS = ("scratch", "slimming", "l1-filter", "uniform", "dense")
SCHEDULES = ("scratch-b", "scratch-e")
REINIT_SEED_OFFSET = 1_000_003
WIDTH_MODELS = ("vgg", "resnet")


def _dense_schedule() -> TrainConfig:
    return TrainConfig(
        epochs=20.0, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4
    )


@dataclass(frozen=True)
class ScratchConfig:
    """One run: find a structure of ``model`` at ``budget`` with ``method``, train it anew.

    ``budget`` is the fraction of the dense FLOPs (MACs) kept (1.0 for ``dense``). ``width``
    multiplies the zoo's widths (VGG and ResNet only) for a smaller dense network. ``train``
    is the dense network's schedule (its epochs, optimizer, rate; the rate decays by 10 at 50%
    and 75%); a pruned network gets ``epochs · dense/pruned FLOPs`` with
    ``schedule="scratch-b"``, the same epochs with ``"scratch-e"``. The ``gate_*`` fields set
    Pruning from Scratch's gate learning, ``slimming`` the L1 strength on BatchNorm γ,
    ``round_to`` the multiple widths are rounded up to; CPU latency is the median of
    ``latency_repeats`` forward passes at batch ``latency_batch``.
    """

    model: str = option("vgg11", help="a VGG or ResNet of `winnow models`")
    data: str = option("fashion-mnist", help="a dataset of `winnow datasets`")
    method: str = option("scratch", help="how the structure is found", choices=METHODS)
    budget: float = option(0.5, help="fraction of the dense FLOPs kept", fraction=True)
    seed: int = option(0, help="seeds the initialisation, the data split and order")
    width: float = option(1.0, help="multiplier of the zoo's widths")
    schedule: str = option(
        "scratch-b", help="training budget of a pruned network", choices=SCHEDULES
    )
    train: TrainConfig = option(factory=_dense_schedule, help="the dense network's schedule")
    gate_epochs: float = option(10.0, help="epochs of gate learning")
    gate_lr: float = option(0.01, help="learning rate of gate learning (Adam)")
    gate_ratio: float = option(0.2, help="r: the expected fraction of non-zero gates")
    gate_penalty: float = option(0.5, help="strength of the penalty (mean|gate| - r)^2")
    gate_l1: float = option(0.0, help="strength of the L1 penalty on the gates")
    slimming: float = option(1e-4, help="network slimming's L1 strength on BatchNorm scales")
    l1_scope: str = option(
        "global", help="L1-filter ranking: global or per layer", choices=("global", "layer")
    )
    round_to: int = option(1, help="round widths up to a multiple of this")
    latency_batch: int = option(64, help="batch of the latency measurement")
    latency_repeats: int = option(20, help="timed forward passes per network")
    data_limit: int | None = option(None, help="keep only the first N examples of each split")
    device: str = option("cpu", help="where to train: cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.model not in models.available():
            raise ValueError(f"unknown model {self.model!r}")
        if not 0 < self.budget <= 1:
            raise ValueError(
                f"budget is a fraction of the dense FLOPs in (0, 1], got {self.budget}"
            )
        if self.method == "dense" and self.budget != 1:
            raise ValueError("the dense method has budget 1.0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.width != 1.0 and not self.model.startswith(WIDTH_MODELS):
            raise ValueError("a width multiplier applies to VGG and ResNet models only")
        if self.train.epochs is None:
            raise ValueError("the scratch experiment's schedule is in epochs (set train.epochs)")
        if not self.width > 0 or not self.gate_epochs > 0:
            raise ValueError("width and gate_epochs must be > 0")
        check_run_seed(self.train)

    def model_options(self) -> dict[str, Any]:
        """The zoo options for ``width`` (VGG ``widths``, ResNet ``width``)."""
        if self.width == 1.0:
            return {}
        if self.model.startswith("resnet"):
            return {"width": max(1, round(16 * self.width))}
        with torch.device("meta"):
            dense = models.create(self.model)
        convs = [m for m in dense.features if isinstance(m, torch.nn.Conv2d)]
        return {"widths": [max(1, round(m.out_channels * self.width)) for m in convs]}

    def train_config(self, epochs: float, train_size: int) -> TrainConfig:
        """The training schedule for ``epochs`` epochs on ``train_size`` examples: ``train``
        with the rate divided by 10 at 50% and 75% of it, and the run's seed."""
        batch = self.train.batch_size
        total = math.ceil(epochs * math.ceil(train_size / batch))
        return replace(
            self.train,
            epochs=epochs,
            iterations=None,
            lr_schedule="step",
            milestones=(total // 2, (3 * total) // 4),
            gamma=0.1,
            seed=self.seed,
        )


PRETRAINED = "scratch-pretrained"
"""The store's experiment of the trained dense networks the slimming, L1-filter and dense
runs share (one per seed and schedule, with and without the slimming penalty)."""
GATES = "scratch-gates"
"""The store's experiment of the gates Pruning from Scratch learns on one seed's random
network, shared by every budget."""


@dataclass(frozen=True)
class PretrainConfig:
    """A dense network trained once and shared: its model, data, seed and schedule, and the
    slimming penalty it was trained with (0 for none)."""

    model: str
    data: str
    seed: int
    width: float
    train: TrainConfig
    data_limit: int | None
    device: str
    strength: float


@dataclass(frozen=True)
class GatesConfig:
    """Gates learned once on one seed's random network and shared by every budget."""

    model: str
    data: str
    seed: int
    width: float
    batch_size: int
    gate_epochs: float
    gate_lr: float
    gate_ratio: float
    gate_penalty: float
    gate_l1: float
    data_limit: int | None
    device: str


def sweep(
    methods: tuple[str, ...] = ("scratch", "slimming", "l1-filter", "uniform"),
    budgets: tuple[float, ...] = (0.5, 0.3),
    seeds: tuple[int, ...] = (0, 1),
    **fields: Any,
) -> list[ScratchConfig]:
    """The runs of a sweep: a dense reference per seed, then every method x budget x seed
    (budgets are fractions of the dense FLOPs, e.g. 0.5 for 50%)."""
    configs = [ScratchConfig(method="dense", budget=1.0, seed=s, **fields) for s in seeds]
    for method in methods:
        if method == "dense":
            continue
        for budget in budgets:
            for seed in seeds:
                configs.append(ScratchConfig(method=method, budget=budget, seed=seed, **fields))
    return configs


def _pretrained(run: Run, config: ScratchConfig, data, spec: dict, strength: float):
    """The dense network of this seed trained on ``config.train`` (with the slimming penalty
    ``strength``): a run of its own in the store, trained on first use; returns the network
    and its metrics."""
    key = PretrainConfig(
        config.model, config.data, config.seed, config.width, config.train, config.data_limit,
        config.device, strength,
    )  # fmt: skip

    def pretrain(shared: Run) -> None:
        model = rebuild(spec, seed=config.seed)
        result = train(
            model,
            data,
            config.train_config(config.train.epochs, len(data.y_train)),
            regularizer=bn_l1(strength) if strength else None,
            device=config.device,
        )
        shared.save_tensors("weights.safetensors", model.to("cpu").state_dict())
        shared.record(
            "result",
            0,
            {
                "test_acc": result.final["test_acc"],
                "val_acc": result.final["val_acc"],
                "seconds": result.seconds,
                "iterations": result.iterations,
            },
            files=["weights.safetensors"],
        )

    shared = run.store.ensure(
        PRETRAINED, key, pretrain, intact=lambda done: done.intact("result", [0])
    )
    run.link(shared)
    model = rebuild(spec, seed=config.seed)
    model.load_state_dict(shared.load_tensors("weights.safetensors"))
    return model, shared.completed("result")[0]


def _learned_gates(run: Run, config: ScratchConfig, data, model) -> tuple[dict, dict]:
    """Pruning from Scratch's gates for this seed: a run of its own in the store, learned once
    and shared by every budget; returns the gates and what to record."""
    key = GatesConfig(
        config.model, config.data, config.seed, config.width, config.train.batch_size,
        config.gate_epochs, config.gate_lr, config.gate_ratio, config.gate_penalty,
        config.gate_l1, config.data_limit, config.device,
    )  # fmt: skip

    def learn(shared: Run) -> None:
        found = learn_gates(
            model,
            data,
            epochs=config.gate_epochs,
            lr=config.gate_lr,
            batch_size=config.train.batch_size,
            ratio=config.gate_ratio,
            penalty=config.gate_penalty,
            l1=config.gate_l1,
            seed=config.seed,
            device=config.device,
        )
        shared.save_tensors("gates.safetensors", found.gates)
        shared.record(
            "gates",
            0,
            {
                "gate_history": found.history,
                "gate_chosen": found.chosen,
                "gate_seconds": found.seconds,
                "gate_iterations": found.iterations,
            },
            files=["gates.safetensors"],
        )

    shared = run.store.ensure(GATES, key, learn, intact=lambda done: done.intact("gates", [0]))
    run.link(shared)
    return shared.load_tensors("gates.safetensors"), shared.completed("gates")[0]


def _find_structure(run: Run, config: ScratchConfig, data, dense_spec: dict) -> dict:
    """Search the structure of this run; returns what ``structure.json`` holds."""
    shape = data.input_shape
    model = rebuild(dense_spec, seed=config.seed)
    selection = {"round_to": config.round_to}
    extra: dict[str, Any] = {}
    started = time.perf_counter()
    shared_seconds = 0.0
    if config.method == "dense":
        structure = uniform_structure(model, 1.0, shape)
    elif config.method == "uniform":
        structure = uniform_structure(model, config.budget, shape, **selection)
    elif config.method == "scratch":
        gates, extra = _learned_gates(run, config, data, model)
        started = time.perf_counter()
        shared_seconds = extra["gate_seconds"]
        structure = threshold_for_budget(
            gates, analyse(model, shape), config.budget, seed=config.seed, **selection
        )
    else:
        strength = config.slimming if config.method == "slimming" else 0.0
        model, metrics = _pretrained(run, config, data, dense_spec, strength)
        started = time.perf_counter()
        shared_seconds = float(metrics["seconds"])
        if config.method == "slimming":
            structure = slimming_structure(
                model, config.budget, shape, seed=config.seed, **selection
            )
        else:
            structure = l1_filter_structure(
                model, config.budget, shape, scope=config.l1_scope, seed=config.seed, **selection
            )
    seconds = time.perf_counter() - started + shared_seconds
    _, spec = shrink(model, structure.masks, shape, dense_spec)
    return {
        "spec": spec,
        "structure": structure.to_dict(),
        "search_seconds": seconds,
        "shared_seconds": shared_seconds,
        **extra,
    }


def execute(run: Run) -> None:
    """Run one configuration: find (or reload) the structure, train it anew, measure it."""
    config: ScratchConfig = run.config
    data = load_data(config.data, config.seed, config.data_limit)
    dense_spec = spec_for(config.model, data, **config.model_options())
    if 0 in run.resume("structure"):
        found = run.load_json("structure.json")
    else:
        found = _find_structure(run, config, data, dense_spec)
        run.save_json("structure.json", found)
        structure = Structure.from_dict(found["structure"])
        run.record(
            "structure",
            0,
            {
                "widths": structure.widths,
                "kept_ratios": structure.kept_ratios(),
                "flops": structure.flops,
                "flops_ratio": structure.flops_ratio,
                "params": structure.params,
                "search_seconds": found["search_seconds"],
                "gate_chosen": found.get("gate_chosen"),
            },
            files=["structure.json"],
        )
    structure = Structure.from_dict(found["structure"])
    if config.method == "dense":
        model, metrics = _pretrained(run, config, data, dense_spec, 0.0)
        epochs, seconds = config.train.epochs, float(metrics["seconds"])
        test_acc, val_acc = metrics["test_acc"], metrics["val_acc"]
    else:
        model = rebuild(found["spec"], seed=config.seed + REINIT_SEED_OFFSET)
        epochs = config.train.epochs
        if config.schedule == "scratch-b":
            epochs = scratch_b_epochs(config.train.epochs, structure.dense_flops, structure.flops)
        result = train(
            model,
            data,
            config.train_config(epochs, len(data.y_train)),
            device=config.device,
        )
        model.to("cpu")
        seconds = result.seconds
        test_acc, val_acc = result.final["test_acc"], result.final["val_acc"]
    save(run.path("pruned.safetensors"), model, found["spec"])
    networks = {"pruned": model}
    if config.method != "dense":
        networks["dense"] = rebuild(dense_spec, seed=config.seed)
    latency = measure_latency(
        networks,
        data.input_shape,
        batch_size=config.latency_batch,
        repeats=config.latency_repeats,
    )
    latency.setdefault("dense", latency["pruned"])
    run.record(
        "result",
        0,
        {
            "test_acc": test_acc,
            "val_acc": val_acc,
            "params": structure.params,
            "dense_params": structure.dense_params,
            "flops": structure.flops,
            "dense_flops": structure.dense_flops,
            "flops_ratio": structure.flops_ratio,
            "epochs_trained": epochs,
            "train_seconds": seconds,
            "search_seconds": found["search_seconds"],
            "latency_ms": 1000 * latency["pruned"],
            "dense_latency_ms": 1000 * latency["dense"],
            "speedup": latency["dense"] / latency["pruned"],
            "threads": torch.get_num_threads(),
        },
    )


def _pct(mean: float | None, std: float | None) -> str:
    return "" if mean is None else f"{100 * mean:.2f} ± {100 * (std or 0):.2f}"


def report(results: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Rebuild the scratch experiment's table and plots from the store at ``results``.

    Writes ``scratch.md``/``.csv`` (per method and budget: test accuracy mean ± std over
    seeds, parameters, FLOPs, FLOPs kept, CPU latency at the configured batch and the speedup
    over the dense network measured in the same run, the structure search's seconds and their
    fraction of one full dense training), ``scratch-structures.md`` (mean correlation of the
    per-layer kept ratios within each method across seeds, and with the other methods),
    ``scratch-correlation-<budget>.png`` (the correlation heatmap of every structure at that
    budget; dense and uniform structures have constant ratios and are left out) and
    ``scratch-layers-<budget>.png`` (kept ratio per layer, seed with the lowest number).
    Returns the written paths by name.
    """
    store = RunStore(results)
    out = Path(out) if out is not None else Path(results) / EXPERIMENT
    rows = store.records(EXPERIMENT, kind="result")
    if not rows:
        raise ValueError(f"no finished {EXPERIMENT} runs in {results}")
    values = ["test_acc", "params", "flops", "flops_ratio", "latency_ms", "speedup"]
    by, varying = configuration_groups(rows, store.config_keys(EXPERIMENT))
    extra = [k for k in varying if k not in ("model", "method", "budget")]
    table = aggregate(rows, by=by, values=[*values, "search_seconds", "train_seconds"])
    order = {m: i for i, m in enumerate(METHODS[::-1])}
    table.sort(key=lambda r: (describe(r, extra), -r["budget"], order[r["method"]]))
    setting = [k for k in by if k not in ("method", "budget")]  # what a dense run shares
    dense_train = {
        describe(r, setting): r["train_seconds_mean"] for r in table if r["method"] == "dense"
    }
    for row in table:
        full = dense_train.get(describe(row, setting))
        search = row["search_seconds_mean"] if row["method"] != "dense" else None
        row["budget %"] = 100 * row["budget"]
        row["test acc %"] = _pct(row["test_acc_mean"], row["test_acc_std"])
        row["params (K)"] = row["params_mean"] / 1e3
        row["MFLOPs"] = row["flops_mean"] / 1e6
        row["FLOPs %"] = 100 * row["flops_ratio_mean"]
        row["latency ms"] = row["latency_ms_mean"]
        row["speedup"] = row["speedup_mean"]
        row["speedup / FLOPs ratio"] = row["speedup_mean"] * row["flops_ratio_mean"]
        row["search s"] = search
        row["search / training"] = search / full if search is not None and full else None
    columns = [
        "model",
        *extra,
        "method",
        "budget %",
        "n",
        "test acc %",
        "params (K)",
        "MFLOPs",
        "FLOPs %",
        "latency ms",
        "speedup",
        "speedup / FLOPs ratio",
        "search s",
        "search / training",
    ]
    formats = {
        "budget %": "{:g}",
        "params (K)": ".1f",
        "MFLOPs": ".2f",
        "FLOPs %": ".1f",
        "latency ms": ".2f",
        "speedup": ".2f",
        "speedup / FLOPs ratio": ".2f",
        "search s": ".1f",
        "search / training": ".3f",
    }
    paths: dict[str, Path] = {}
    paths["table"], paths["csv"] = write_table(table, columns, out, formats=formats)
    paths.update(_structure_report(store, out))
    return paths


def _structure_report(store: RunStore, out: Path) -> dict[str, Path]:
    structures = [
        r
        for r in store.records(EXPERIMENT, kind="structure")
        if r["method"] not in ("dense", "uniform")
    ]
    paths: dict[str, Path] = {}
    lines = []
    for budget in sorted({r["budget"] for r in structures}, reverse=True):
        chosen = [r for r in structures if r["budget"] == budget]
        ratios = {f"{r['method']} seed {r['seed']}": r["kept_ratios"] for r in chosen}
        if len(ratios) < 2:
            continue
        labels, matrix = structure_correlation(ratios)
        tag = f"{100 * budget:g}"
        paths[f"correlation {tag}%"] = correlation_heatmap(
            labels,
            matrix,
            out.parent / f"{out.name}-correlation-{tag}.png",
            title=f"Per-layer kept ratios at {tag}% of the dense FLOPs",
        )
        first_seed = min(r["seed"] for r in chosen)
        paths[f"layers {tag}%"] = bar_plot(
            {r["method"]: r["kept_ratios"] for r in chosen if r["seed"] == first_seed},
            out.parent / f"{out.name}-layers-{tag}.png",
            xlabel="channel group (first layer)",
            ylabel="fraction of channels kept",
            title=f"Structures at {tag}% of the dense FLOPs (seed {first_seed})",
        )
        methods = list(dict.fromkeys(r["method"] for r in chosen))
        for method in methods:

            def mine(label: str, m: str = method) -> bool:
                return label.startswith(f"{m} seed ")

            lines.append(
                {
                    "budget %": 100 * budget,
                    "method": method,
                    "seeds": sum(r["method"] == method for r in chosen),
                    "within method (across seeds)": mean_correlation(labels, matrix, mine),
                    "with other methods": mean_correlation(
                        labels, matrix, mine, lambda label, f=mine: not f(label)
                    ),
                }
            )
    if lines:
        text = (
            "Mean Pearson correlation of per-layer kept-channel ratios (Wang et al. 2020: "
            "structures found on random weights vary more across seeds).\n\n"
        )
        text += markdown_table(
            lines,
            list(lines[0]),
            formats={
                "budget %": "{:g}",
                "within method (across seeds)": ".3f",
                "with other methods": ".3f",
            },
        )
        path = out.parent / f"{out.name}-structures.md"
        atomic_write_bytes(path, text.encode("utf-8"))
        paths["structures"] = path
    return paths


EXPERIMENT_SPEC = register(
    Experiment(
        name=EXPERIMENT,
        help="Pruning from Scratch vs slimming, L1-filter and uniform at FLOPs budgets",
        config=ScratchConfig,
        axes=(
            Axis(
                "method",
                "methods",
                str,
                ("scratch", "slimming", "l1-filter", "uniform"),
                "methods to compare (dense runs are added)",
            ),
            Axis(
                "budget", "budgets", parse_fraction, (0.5, 0.3), "fractions of the dense FLOPs kept"
            ),
            Axis("seed", "seeds", int, (0, 1), "seeds"),
        ),
        sweep=sweep,
        execute=execute,
        report=report,
    )
)


def run(results: str | Path, configs: list[ScratchConfig], progress: bool = True) -> RunStore:
    """Execute the sweep into the run store at ``results`` (finished runs are skipped)."""
    return EXPERIMENT_SPEC.run(results, configs, progress)[0]
