"""The pruning-at-initialisation experiment: methods x densities x seeds, with controls.

Each run prunes a freshly initialised network with one criterion to one density, trains the
sparse network, and stores its masks and metrics in the run store as it finishes, so an
interrupted sweep resumes without redoing finished runs. Controls (Frankle et al. 2021,
"Pruning neural networks at initialization: why are we missing the mark?"):

- ``shuffle``: each layer's mask permuted within the layer (same per-layer densities);
- ``reinit``: the same mask on a freshly re-initialised network.

A ``dense`` run per seed gives the reference accuracy. :func:`report` rebuilds the table and
the plots from the store alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from winnow import models
from winnow.analysis import gradient_norm, shuffle_within_layers
from winnow.core.densities import SCOPES, check_density
from winnow.core.masks import Masks
from winnow.criteria import available as available_criteria
from winnow.criteria import lookup
from winnow.experiments.common import load_data
from winnow.experiments.configs import check_run_seed
from winnow.experiments.registry import Axis, Experiment, register
from winnow.experiments.report import (
    aggregate,
    bar_plot,
    configuration_groups,
    describe,
    line_plot,
    write_table,
)
from winnow.experiments.store import Run, RunStore
from winnow.options import option, parse_fraction
from winnow.schedules import prune_at_init
from winnow.training import TrainConfig, train

EXPERIMENT = "at-init"
CONTROLS = ("none", "shuffle", "reinit")
PAPER_DENSITIES = (0.1, 0.05, 0.02, 0.01, 0.005, 0.002)
REINIT_SEED_OFFSET = 1_000_003


def _five_epochs() -> TrainConfig:
    return TrainConfig(epochs=5.0)


@dataclass(frozen=True)
class AtInitConfig:
    """One run: prune ``model`` at init with ``method`` to ``density``, then train it."""

    model: str = option("lenet300", help="a model of `winnow models`")
    data: str = option("fashion-mnist", help="a dataset of `winnow datasets`")
    method: str = option("snip", help="a criterion of winnow.criteria, or dense")
    density: float = option(0.1, help="fraction of the weights kept", fraction=True)
    seed: int = option(0, help="seeds the initialisation, the data split and order, the masks")
    control: str = option("none", help="the control applied to the mask", choices=CONTROLS)
    rounds: int | None = option(
        None, help="pruning rounds (none: 100 for synflow, 1 for the other criteria)"
    )
    scope: str = option(
        "global", help="one threshold for all layers, or one per layer", choices=SCOPES
    )
    train: TrainConfig = option(factory=_five_epochs, help="how every network is trained")
    data_limit: int | None = option(None, help="keep only the first N examples of each split")
    device: str = option("cpu", help="where to prune and train: cpu, cuda, cuda:1, ...")
    keep_weights: bool = option(
        True, help="keep the trained weights (final.safetensors, for winnow pack)"
    )

    def __post_init__(self) -> None:
        if self.method != "dense" and self.method not in available_criteria():
            raise ValueError(
                f"unknown method {self.method!r}; available: dense, "
                + ", ".join(available_criteria())
            )
        check_density(self.density)
        if self.control not in CONTROLS:
            raise ValueError(f"unknown control {self.control!r}; choose one of {CONTROLS}")
        if self.model not in models.available():
            raise ValueError(f"unknown model {self.model!r}")
        check_run_seed(self.train)

    def train_config(self) -> TrainConfig:
        """How this run trains: ``train`` with the run's seed."""
        return replace(self.train, seed=self.seed)


def sweep(
    methods: tuple[str, ...] = ("random", "magnitude", "snip", "grasp", "synflow"),
    densities: tuple[float, ...] = PAPER_DENSITIES,
    seeds: tuple[int, ...] = (0, 1, 2),
    controls: tuple[str, ...] = ("none", "shuffle"),
    **fields,
) -> list[AtInitConfig]:
    """The runs of a sweep: a dense reference per seed, then every method x density x seed x
    control (densities are fractions kept, e.g. 0.01 for 1%); ``fields`` are the other
    :class:`AtInitConfig` fields. The methods themselves always run: a control is added
    beside them, never in their place."""
    if "none" not in controls:
        controls = ("none", *controls)
    configs = [AtInitConfig(method="dense", density=1.0, seed=s, **fields) for s in seeds]
    for method in methods:
        for density in densities:
            for seed in seeds:
                for control in controls:
                    configs.append(
                        AtInitConfig(
                            method=method, density=density, seed=seed, control=control, **fields
                        )
                    )
    return configs


FINAL_WEIGHTS = "final.safetensors"
"""The trained weights of a run (what ``winnow pack <run directory>`` reads)."""


def _pruned_intact(run: Run) -> bool:
    return run.intact("prune", [0])


def _masks(run: Run, config: AtInitConfig, model, data) -> Masks:
    """The method's masks for this run's model: the stored ones when the run's prune record
    vouches for them (same digest), else pruned anew; for a control, those of the method's own
    run (its parent in the store, run again first if it is not done or its masks changed)."""
    if config.control != "none":
        parent = run.store.ensure(
            EXPERIMENT, replace(config, control="none"), execute, intact=_pruned_intact
        )
        run.link(parent)
        return Masks.load(parent.path("masks.safetensors"))
    if _pruned_intact(run):
        return Masks.load(run.path("masks.safetensors"))
    options = {"seed": config.seed} if lookup(config.method).takes_seed() else {}
    masks = prune_at_init(
        model.to(config.device), config.method, config.density, data, rounds=config.rounds,
        scope=config.scope, **options,
    ).cpu()  # fmt: skip
    masks.save(run.path("masks.safetensors"))
    return masks


def execute(run: Run) -> None:
    """Run one configuration: prune (or reuse the stored masks), apply the control, train."""
    config: AtInitConfig = run.config
    data = load_data(config.data, config.seed, config.data_limit)
    model = models.create_for(config.model, data, seed=config.seed)
    masks = None
    if config.method != "dense":
        masks = _masks(run, config, model, data)
        pruned = {"layer_density": masks.layer_density(), "collapsed": masks.collapsed_layers()}
        if config.control == "none":
            pruned["grad_norm_dense"] = gradient_norm(model, data)
            pruned["grad_norm_pruned"] = gradient_norm(model, data, masks)
        elif config.control == "shuffle":
            masks = shuffle_within_layers(masks, seed=config.seed)
        elif config.control == "reinit":
            model = models.create_for(config.model, data, seed=config.seed + REINIT_SEED_OFFSET)
        files = ["masks.safetensors"] if config.control == "none" else []
        run.record("prune", 0, pruned, files=files)
    result = train(model, data, config.train_config(), masks=masks, device=config.device)
    best = result.early_stop
    files = []
    if config.keep_weights:
        state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        run.save_tensors(FINAL_WEIGHTS, state)
        files = [FINAL_WEIGHTS]
    run.record(
        "result",
        0,
        {
            "test_acc": result.final["test_acc"],
            "val_acc": result.final["val_acc"],
            "early_stop_test_acc": best["test_acc"],
            "early_stop_iteration": best["iteration"],
            "density_kept": masks.density() if masks is not None else 1.0,
            "seconds": result.seconds,
        },
        files=files,
    )


def report(results: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Rebuild the table and plots of the at-init experiment from the store at ``results``.

    Writes ``at-init.md``/``.csv`` (mean ± std test accuracy over seeds per method, control and
    density), ``at-init-accuracy.png`` (accuracy vs density, log x, one line per method and
    control, dense as reference) and ``at-init-layers.png`` (fraction kept per layer for each
    method at the lowest density). Returns the written paths by name.
    """
    store = RunStore(results)
    out = Path(out) if out is not None else Path(results) / EXPERIMENT
    rows = store.records(EXPERIMENT, kind="result")
    if not rows:
        raise ValueError(f"no finished {EXPERIMENT} runs in {results}")
    by, varying = configuration_groups(rows, store.config_keys(EXPERIMENT))
    shown = ["model", "method", "control", "density %", "test acc %", "early-stop acc %", "n"]
    extra = [k for k in varying if k not in ("model", "method", "control", "density")]
    table = aggregate(rows, by=by, values=["test_acc", "early_stop_test_acc"])
    table.sort(
        key=lambda r: (r["method"] != "dense", r["method"], r["control"], -r["density"],
                       describe(r, extra))
    )  # fmt: skip
    for row in table:
        row["density %"] = 100 * row["density"]
        row["test acc %"] = f"{100 * row['test_acc_mean']:.2f} ± {100 * row['test_acc_std']:.2f}"
        row["early-stop acc %"] = (
            f"{100 * row['early_stop_test_acc_mean']:.2f} ± "
            f"{100 * row['early_stop_test_acc_std']:.2f}"
        )
    paths = {}
    md, csv = write_table(
        table, [*shown[:4], *extra, *shown[4:]], out.parent / out.name,
        formats={"density %": "{:g}"},
    )  # fmt: skip
    paths["table"], paths["csv"] = md, csv
    dense = [r for r in table if r["method"] == "dense"]
    series: dict[str, list[tuple[float, float, float]]] = {}
    for row in table:
        if row["method"] == "dense":
            continue
        label = row["method"] + ("" if row["control"] == "none" else f" ({row['control']})")
        if extra:
            label += f" [{describe(row, extra)}]"
        series.setdefault(label, []).append(
            (100 * row["density"], 100 * row["test_acc_mean"], 100 * row["test_acc_std"])
        )
    paths["accuracy"] = line_plot(
        {k: sorted(v) for k, v in series.items()},
        out.parent / f"{out.name}-accuracy.png",
        xlabel="weights remaining (%)",
        ylabel="test accuracy (%)",
        title=f"Pruning at initialisation: {rows[0]['model']} on {rows[0]['data']}",
        logx=True,
        reference=100 * dense[0]["test_acc_mean"] if dense else None,
    )
    prune_rows = [r for r in store.records(EXPERIMENT, kind="prune") if r.get("control") == "none"]
    if prune_rows:
        lowest = min(r["density"] for r in prune_rows)
        groups: dict[str, dict[str, float]] = {}
        for r in prune_rows:
            if r["density"] == lowest and r["seed"] == min(p["seed"] for p in prune_rows):
                groups[r["method"]] = {k: 100 * v for k, v in r["layer_density"].items()}
        paths["layers"] = bar_plot(
            groups,
            out.parent / f"{out.name}-layers.png",
            xlabel="layer",
            ylabel=f"weights kept (%) at {100 * lowest:g}% overall",
            title="Fraction kept per layer",
        )
    return paths


EXPERIMENT_SPEC = register(
    Experiment(
        name=EXPERIMENT,
        help="methods x densities x seeds, pruned at initialisation, then trained",
        config=AtInitConfig,
        axes=(
            Axis(
                "method",
                "methods",
                str,
                ("random", "magnitude", "snip", "grasp", "synflow"),
                "criteria to compare",
            ),
            Axis(
                "density",
                "densities",
                parse_fraction,
                PAPER_DENSITIES,
                "fractions of the weights kept (0.1 or 10%)",
            ),
            Axis("seed", "seeds", int, (0, 1, 2), "seeds"),
            Axis(
                "control",
                "controls",
                str,
                ("none", "shuffle"),
                "controls run beside the methods: shuffle, reinit",
            ),
        ),
        sweep=sweep,
        execute=execute,
        report=report,
    )
)


def run(results: str | Path, configs: list[AtInitConfig], progress: bool = True) -> RunStore:
    """Execute the sweep into the run store at ``results`` (finished runs are skipped)."""
    return EXPERIMENT_SPEC.run(results, configs, progress)[0]
