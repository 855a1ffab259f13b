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
slimming penalty is shared between the runs of one seed (stored once under
``<results>/scratch/pretrained/``), and its training time is the "one full training run" the
search costs are compared with; so are the gates Pruning from Scratch learns on a seed's
random network (``<results>/scratch/gates/``), which serve every budget. A search costs the
time its shared part took when it was computed, plus the selection. A run stores its
structure (``structure.json``: spec, masks, widths) before training, so an interrupted run
resumes after the search; the trained pruned network is saved as ``pruned.safetensors``
(state dict + spec, see :func:`winnow.structured.save`). :func:`report` rebuilds the table
(accuracy, parameters, FLOPs, measured CPU latency at batch 64, search cost) and the
structure-correlation heatmaps from the store alone.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import winnow
from winnow.experiments.common import load_data
from winnow.experiments.report import aggregate, bar_plot, markdown_table, write_table
from winnow.experiments.runner import run_sweep
from winnow.experiments.store import Run, RunStore, config_id
from winnow.io import atomic_write_bytes, load_tensors, save_tensors
from winnow.io import tensor_metadata as read_metadata
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
from winnow.training import OPTIMIZERS, TrainConfig, train

EXPERIMENT = "scratch"
METHODS = ("scratch", "slimming", "l1-filter", "uniform", "dense")
SCHEDULES = ("scratch-b", "scratch-e")
REINIT_SEED_OFFSET = 1_000_003
WIDTH_MODELS = ("vgg", "resnet")


@dataclass(frozen=True)
class ScratchConfig:
    """One run: find a structure of ``model`` at ``budget`` with ``method``, train it anew.

    ``budget`` is the fraction of the dense FLOPs (MACs) kept (1.0 for ``dense``). ``width``
    multiplies the zoo's widths (VGG and ResNet only) for a smaller dense network. ``epochs``
    is the dense network's schedule (SGD, momentum, step decay by 10 at 50% and 75%); a
    pruned network gets ``epochs · dense/pruned FLOPs`` with ``schedule="scratch-b"``, the
    same epochs with ``"scratch-e"``. The ``gate_*`` fields set Pruning from Scratch's gate
    learning, ``slimming`` the L1 strength on BatchNorm γ, ``round_to`` the multiple widths
    are rounded up to; CPU latency is the median of ``latency_repeats`` forward passes at
    batch ``latency_batch``.
    """

    model: str = "vgg11"
    data: str = "fashion-mnist"
    method: str = "scratch"
    budget: float = 0.5
    seed: int = 0
    width: float = 1.0
    epochs: float = 20.0
    schedule: str = "scratch-b"
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    gate_epochs: float = 10.0
    gate_lr: float = 0.01
    gate_ratio: float = 0.2
    gate_penalty: float = 0.5
    gate_l1: float = 0.0
    slimming: float = 1e-4
    l1_scope: str = "global"
    round_to: int = 1
    latency_batch: int = 64
    latency_repeats: int = 20
    data_limit: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.model not in winnow.models.available():
            raise ValueError(f"unknown model {self.model!r}")
        if not 0 < self.budget <= 1:
            raise ValueError(
                f"budget is a fraction of the dense FLOPs in (0, 1], got {self.budget}"
            )
        if self.method == "dense" and self.budget != 1:
            raise ValueError("the dense method has budget 1.0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}")
        if self.width != 1.0 and not self.model.startswith(WIDTH_MODELS):
            raise ValueError("a width multiplier applies to VGG and ResNet models only")
        if not self.width > 0 or not self.epochs > 0 or not self.gate_epochs > 0:
            raise ValueError("width, epochs and gate_epochs must be > 0")

    def model_options(self) -> dict[str, Any]:
        """The zoo options for ``width`` (VGG ``widths``, ResNet ``width``)."""
        if self.width == 1.0:
            return {}
        if self.model.startswith("resnet"):
            return {"width": max(1, round(16 * self.width))}
        with torch.device("meta"):
            dense = winnow.models.create(self.model)
        convs = [m for m in dense.features if isinstance(m, torch.nn.Conv2d)]
        return {"widths": [max(1, round(m.out_channels * self.width)) for m in convs]}

    def train_config(self, epochs: float, train_size: int) -> TrainConfig:
        """The training schedule for ``epochs`` epochs on ``train_size`` examples."""
        total = math.ceil(epochs * math.ceil(train_size / self.batch_size))
        return TrainConfig(
            epochs=epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            lr_schedule="step",
            milestones=(total // 2, (3 * total) // 4),
            gamma=0.1,
            seed=self.seed,
        )


@dataclass(frozen=True)
class _Pretrain:
    """What identifies a trained dense network shared between runs."""

    model: str
    data: str
    seed: int
    width: float
    epochs: float
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    data_limit: int | None
    device: str
    strength: float


def sweep(
    model: str = "vgg11",
    data: str = "fashion-mnist",
    methods: tuple[str, ...] = ("scratch", "slimming", "l1-filter", "uniform"),
    budgets: tuple[float, ...] = (0.5, 0.3),
    seeds: tuple[int, ...] = (0, 1),
    **options: Any,
) -> list[ScratchConfig]:
    """The runs of a sweep: a dense reference per seed, then every method x budget x seed
    (budgets are fractions of the dense FLOPs, e.g. 0.5 for 50%)."""
    configs = [
        ScratchConfig(model=model, data=data, method="dense", budget=1.0, seed=s, **options)
        for s in seeds
    ]
    for method in methods:
        if method == "dense":
            continue
        for budget in budgets:
            for seed in seeds:
                configs.append(
                    ScratchConfig(
                        model=model, data=data, method=method, budget=budget, seed=seed, **options
                    )
                )
    return configs


def _pretrained(run: Run, config: ScratchConfig, data, spec: dict, strength: float):
    """The dense network of this seed trained for ``config.epochs`` (with the slimming
    penalty ``strength``), from the shared cache, trained and stored on first use."""
    key = _Pretrain(
        config.model,
        config.data,
        config.seed,
        config.width,
        config.epochs,
        config.batch_size,
        config.optimizer,
        config.lr,
        config.momentum,
        config.weight_decay,
        config.data_limit,
        config.device,
        strength,
    )
    path = run.dir.parent / "pretrained" / f"{config_id(key)}.safetensors"
    model = rebuild(spec, seed=config.seed)
    if path.is_file():
        model.load_state_dict(load_tensors(path))
        return model, read_metadata(path)
    result = train(
        model,
        data,
        config.train_config(config.epochs, len(data.y_train)),
        regularizer=bn_l1(strength) if strength else None,
        device=config.device,
    )
    model.to("cpu")
    metrics = {
        "test_acc": result.final["test_acc"],
        "val_acc": result.final["val_acc"],
        "seconds": result.seconds,
        "iterations": result.iterations,
    }
    save_tensors(path, model.state_dict(), metadata=metrics)
    return model, metrics


@dataclass(frozen=True)
class _Gates:
    """What identifies the gates learned on one seed's random network (any budget)."""

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


def _learned_gates(run: Run, config: ScratchConfig, data, model) -> tuple[dict, dict]:
    """Pruning from Scratch's gates for this seed, learned once and shared by every budget
    (stored under ``<results>/scratch/gates/``); returns the gates and what to record."""
    key = _Gates(
        config.model,
        config.data,
        config.seed,
        config.width,
        config.batch_size,
        config.gate_epochs,
        config.gate_lr,
        config.gate_ratio,
        config.gate_penalty,
        config.gate_l1,
        config.data_limit,
        config.device,
    )
    path = run.dir.parent / "gates" / f"{config_id(key)}.safetensors"
    if path.is_file():
        return load_tensors(path), read_metadata(path)
    found = learn_gates(
        model,
        data,
        epochs=config.gate_epochs,
        lr=config.gate_lr,
        batch_size=config.batch_size,
        ratio=config.gate_ratio,
        penalty=config.gate_penalty,
        l1=config.gate_l1,
        seed=config.seed,
        device=config.device,
    )
    extra = {
        "gate_history": found.history,
        "gate_chosen": found.chosen,
        "gate_seconds": found.seconds,
        "gate_iterations": found.iterations,
    }
    save_tensors(path, found.gates, metadata=extra)
    return found.gates, extra


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
    if 0 in run.completed("structure"):
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
        )
    structure = Structure.from_dict(found["structure"])
    if config.method == "dense":
        model, metrics = _pretrained(run, config, data, dense_spec, 0.0)
        epochs, seconds = config.epochs, float(metrics["seconds"])
        test_acc, val_acc = metrics["test_acc"], metrics["val_acc"]
    else:
        model = rebuild(found["spec"], seed=config.seed + REINIT_SEED_OFFSET)
        epochs = config.epochs
        if config.schedule == "scratch-b":
            epochs = scratch_b_epochs(config.epochs, structure.dense_flops, structure.flops)
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


def run(results: str | Path, configs: list[ScratchConfig], progress: bool = True) -> RunStore:
    """Execute the sweep into the run store at ``results`` (finished runs are skipped)."""
    store = RunStore(results)
    run_sweep(store, EXPERIMENT, configs, execute, progress=progress)
    return store


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
    table = aggregate(
        rows,
        by=["model", "data", "method", "budget"],
        values=[*values, "search_seconds", "train_seconds"],
    )
    order = {m: i for i, m in enumerate(METHODS[::-1])}
    table.sort(key=lambda r: (-r["budget"], order[r["method"]]))
    dense_train = {
        (r["model"], r["data"]): r["train_seconds_mean"] for r in table if r["method"] == "dense"
    }
    for row in table:
        full = dense_train.get((row["model"], row["data"]))
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


def add_command(experiments: argparse._SubParsersAction) -> None:
    """Add ``winnow experiment scratch`` to the ``experiment`` subcommands."""
    parser = experiments.add_parser(
        "scratch", help="Pruning from Scratch vs slimming, L1-filter and uniform at FLOPs budgets"
    )
    parser.add_argument("--model", default="vgg11", help="a VGG or ResNet of `winnow models`")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--budgets", default="50,30", help="percent of the dense FLOPs kept")
    parser.add_argument("--methods", default="scratch,slimming,l1-filter,uniform")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=float, default=20, help="the dense schedule")
    parser.add_argument("--width", type=float, default=1.0, help="multiplier of the zoo widths")
    parser.add_argument("--gate-epochs", type=float, default=10)
    parser.add_argument("--schedule", choices=SCHEDULES, default="scratch-b")
    parser.add_argument("--round-to", type=int, default=1, help="round widths up to a multiple")
    parser.add_argument("--limit", type=int, help="keep only the first N examples of each split")
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--no-progress", action="store_true")


def command(args: argparse.Namespace) -> None:
    """Run (``experiment scratch``) or report (``experiment report scratch``) from the CLI."""
    from winnow.cli import csv_list

    if args.experiment != "report":
        configs = sweep(
            model=args.model,
            data=args.data,
            methods=csv_list(args.methods),
            budgets=tuple(b / 100 for b in csv_list(args.budgets, float)),
            seeds=csv_list(args.seeds, int),
            epochs=args.epochs,
            width=args.width,
            gate_epochs=args.gate_epochs,
            schedule=args.schedule,
            round_to=args.round_to,
            data_limit=args.limit,
            latency_batch=args.latency_batch,
            latency_repeats=args.latency_repeats,
            device=args.device,
        )
        print(f"{len(configs)} runs into {args.results} (finished runs are skipped)")
        run(args.results, configs, progress=not args.no_progress)
    paths = report(args.results)
    print(paths["table"].read_text())
    if "structures" in paths:
        print(paths["structures"].read_text())
    for name, path in paths.items():
        print(f"{name}: {path}")
