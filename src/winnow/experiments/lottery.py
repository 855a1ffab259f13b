"""The lottery-ticket experiment: iterative magnitude pruning with its controls, resumable.

A ticket run (``control="none"``) follows :func:`winnow.schedules.iterative_magnitude_pruning`
(Frankle & Carbin 2019; rewinding, Frankle et al. 2020) and writes, as it goes, θ₀
(``init.safetensors``), the rewind weights θ_k (``rewind.safetensors``), the mask of every
round (``masks-<r>.safetensors``) and one ``round`` record per round. Files come first and
the record last, so a run killed at any point (even by SIGKILL) resumes at its last
finished round and ends with exactly the results of an uninterrupted run.

Controls are follow-ups that reuse a finished ticket run (OpenLTH's branches): for every
pruned round r they train, exactly like the ticket (same schedule, from the same iteration),

- ``reinit``: the ticket's mask on a fresh random initialisation;
- ``random``: a random mask with the ticket's per-layer densities on the ticket's weights.

:func:`report` rebuilds from the store the table, the accuracy and early-stop plots of the
paper (against the percentage of weights remaining, log scale, error bars over seeds) and
the mask overlaps (between seeds, and between consecutive rounds).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

from winnow import models
from winnow.analysis import shuffle_within_layers
from winnow.core.densities import check_scope, check_sparsity
from winnow.core.masks import Masks
from winnow.experiments.common import load_data
from winnow.experiments.configs import check_run_seed, flatten
from winnow.experiments.registry import Axis, Experiment, register
from winnow.experiments.report import (
    aggregate,
    configuration_groups,
    describe,
    line_plot,
    write_table,
)
from winnow.experiments.store import Run, RunStore
from winnow.options import option
from winnow.schedules.lottery import iterative_magnitude_pruning, lottery_rates, train_round
from winnow.training import TrainConfig, TrainResult

EXPERIMENT = "lottery"
CONTROLS = ("none", "reinit", "random")
REINIT_SEED_OFFSET = 1_000_003
LABELS = {"none": "ticket", "reinit": "random reinit", "random": "random mask"}


def _five_epochs() -> TrainConfig:
    return TrainConfig(epochs=5.0)


@dataclass(frozen=True)
class LotteryConfig:
    """One run: ``rounds`` rounds of iterative magnitude pruning of ``model`` on ``data``.

    ``rate`` is the fraction of the remaining weights pruned per round in fully connected
    layers (or everywhere with ``scope="global"``); ``conv_rate`` for convolutions (default
    ``rate``) and ``output_rate`` for the output layer (default ``rate / 2``), as in Frankle &
    Carbin 2019. ``rewind`` is the iteration k the survivors are reset to (0: θ₀). ``train``
    is each round's training (its budget in epochs or iterations).
    """

    model: str = option("lenet300", help="a model of `winnow models`")
    data: str = option("fashion-mnist", help="a dataset of `winnow datasets`")
    rounds: int = option(18, help="pruning rounds after the dense one")
    rate: float = option(
        0.2,
        help="fraction of the remaining weights pruned per round (fully connected layers, "
        "or all with --scope global)",
        fraction=True,
    )
    conv_rate: float | None = option(
        None, help="rate for convolutions (none: --rate)", fraction=True
    )
    output_rate: float | None = option(
        None, help="rate for the output layer (none: --rate / 2)", fraction=True
    )
    scope: str = option(
        "layer", help="prune each layer, or rank all together", choices=("layer", "global")
    )
    rewind: int = option(0, help="rewind iteration k (0: reset to θ₀)")
    seed: int = option(0, help="seeds the initialisation, the data split and order")
    control: str = option("none", help="ticket or control", choices=CONTROLS)
    train: TrainConfig = option(factory=_five_epochs, help="how every round is trained")
    data_limit: int | None = option(None, help="keep only the first N examples of each split")
    device: str = option("cpu", help="where to train: cpu, cuda, cuda:1, ...")
    keep_weights: bool = option(
        True, help="keep the last round's trained weights (final.safetensors, for winnow pack)"
    )

    def __post_init__(self) -> None:
        if self.model not in models.available():
            raise ValueError(f"unknown model {self.model!r}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        for rate in (self.rate, self.conv_rate, self.output_rate):
            if rate is not None:
                check_sparsity(rate)
        check_scope(self.scope)
        if self.control not in CONTROLS:
            raise ValueError(f"unknown control {self.control!r}; choose one of {CONTROLS}")
        if self.rewind < 0:
            raise ValueError(f"rewind must be >= 0, got {self.rewind}")
        check_run_seed(self.train)

    def train_config(self) -> TrainConfig:
        """How every round trains: ``train`` with the run's seed."""
        return replace(self.train, seed=self.seed)

    def ticket(self) -> LotteryConfig:
        """The ticket run a control run follows."""
        return replace(self, control="none")


def sweep(
    seeds: tuple[int, ...] = (0, 1, 2),
    controls: tuple[str, ...] = ("none", "reinit", "random"),
    **fields,
) -> list[LotteryConfig]:
    """The runs of a sweep: for every seed, the ticket run, then its controls (in order, so
    each control finds its ticket finished). ``fields`` are :class:`LotteryConfig` fields."""
    if "none" not in controls:
        controls = ("none", *controls)
    return [LotteryConfig(seed=s, control=c, **fields) for s in seeds for c in controls]


def _rates(config: LotteryConfig, model) -> float | dict[str, float]:
    if config.scope == "global":
        return config.rate
    return lottery_rates(model, config.rate, config.conv_rate, config.output_rate)


def _metrics(masks: Masks, result: TrainResult) -> dict:
    best = result.early_stop
    return {
        "density": masks.density(),
        "layer_density": masks.layer_density(),
        "early_stop_test_acc": best["test_acc"],
        "early_stop_val_loss": best["val_loss"],
        "early_stop_iteration": best["iteration"],
        "test_acc": result.final["test_acc"],
        "val_acc": result.final["val_acc"],
        "seconds": result.seconds,
    }


def _masks_file(round_: int) -> str:
    return f"masks-{round_}.safetensors"


def _execute_ticket(run: Run) -> None:
    """The ticket's rounds, resumed after the last round whose files are intact: round 0's
    record names θ₀, θ_k and the first two masks, every later round's the mask it pruned, so a
    damaged or replaced file makes the round that wrote it run again."""
    config: LotteryConfig = run.config
    data = load_data(config.data, config.seed, config.data_limit)
    model = models.create_for(config.model, data, seed=config.seed)  # θ₀, the same every time
    done = run.resume("round")
    start = next(r for r in range(config.rounds + 2) if r not in done)
    if start > config.rounds:
        return
    resume = {}
    if start == 0:
        run.save_tensors("init.safetensors", model.state_dict())
    else:
        resume = {
            "masks": Masks.load(run.path(_masks_file(start))),
            "rewind_state": run.load_tensors("rewind.safetensors"),
            "start_round": start,
        }
    rounds = iterative_magnitude_pruning(
        model,
        data,
        config.train_config(),
        config.rounds,
        _rates(config, model),
        scope=config.scope,
        rewind_iteration=config.rewind,
        device=config.device,
        **resume,
    )
    for r in rounds:
        files = [_masks_file(r.round + 1)]
        if r.round == 0:
            run.save_tensors("rewind.safetensors", r.rewind_state, {"iteration": config.rewind})
            r.masks.save(run.path(_masks_file(0)))
            files = ["init.safetensors", "rewind.safetensors", _masks_file(0), *files]
        r.next_masks.save(run.path(_masks_file(r.round + 1)))
        if r.round == config.rounds and config.keep_weights:
            _keep_final(run, r.trained, r.round)
            files.append(FINAL_WEIGHTS)
        run.record("round", r.round, _metrics(r.masks, r.result), files=files)


FINAL_WEIGHTS = "final.safetensors"
"""The trained weights of a run's last round (what ``winnow pack <run directory>`` reads)."""


def _keep_final(run: Run, state, round_: int) -> None:
    plain = {k: v.detach().to("cpu") for k, v in state.items()}
    run.save_tensors(FINAL_WEIGHTS, plain, {"round": round_})


def _ticket_intact(ticket: Run) -> bool:
    return ticket.intact("round", range(ticket.config.rounds + 1))


def _execute_control(run: Run) -> None:
    config: LotteryConfig = run.config
    ticket = run.store.require(
        EXPERIMENT, config.ticket(), f"the {config.control} control needs its ticket run"
    )
    if not _ticket_intact(ticket):
        ticket.interrupted()  # the next sweep redoes the rounds whose files are damaged
        raise RuntimeError(
            f"the files of ticket run {EXPERIMENT}/{ticket.run_id} are damaged or changed; "
            "it is marked interrupted and is resumed (recomputed) by the next run of the sweep"
        )
    run.link(ticket)
    data = load_data(config.data, config.seed, config.data_limit)
    model = models.create_for(config.model, data, seed=config.seed)
    if config.control == "reinit":
        state = models.create_for(
            config.model, data, seed=config.seed + REINIT_SEED_OFFSET
        ).state_dict()
    else:
        state = ticket.load_tensors("rewind.safetensors")
    done = run.completed("round")
    for round_ in range(1, config.rounds + 1):
        if round_ in done:
            continue
        masks = Masks.load(ticket.path(_masks_file(round_)))
        if config.control == "random":
            masks = shuffle_within_layers(masks, seed=config.seed * 1000 + round_)
        trained, result = train_round(
            model,
            state,
            masks,
            data,
            config.train_config(),
            start_iteration=config.rewind,
            device=config.device,
            description=f"{config.control} {round_}",
        )
        files = []
        if round_ == config.rounds and config.keep_weights:
            _keep_final(run, trained.state_dict(), round_)
            files = [FINAL_WEIGHTS]
        run.record("round", round_, _metrics(masks, result), files=files)


def execute(run: Run) -> None:
    """Run (or resume) one configuration: the ticket's rounds, or one control's."""
    if run.config.control == "none":
        _execute_ticket(run)
    else:
        _execute_control(run)


def report(results: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Rebuild the lottery-ticket report from the store at ``results``.

    Writes ``lottery.md``/``.csv`` (per control and round: percent of weights remaining, test
    accuracy at the early-stop iteration and at the end, the early-stop iteration; mean ± std
    over seeds), ``lottery-accuracy.png`` and ``lottery-early-stop.png`` (against percent
    remaining, log x), and ``lottery-overlap.md``/``.csv`` (Jaccard overlap of the tickets of
    different seeds at each round, beside the overlap expected of random masks with the same
    per-layer densities, and of consecutive rounds). Returns the written paths by name.
    """
    store = RunStore(results)
    out = Path(out) if out is not None else Path(results) / EXPERIMENT
    rows = store.records(EXPERIMENT, kind="round")
    if not rows:
        raise ValueError(f"no finished {EXPERIMENT} runs in {results}")
    by, varying = configuration_groups(rows, store.config_keys(EXPERIMENT))
    extra = [k for k in varying if k not in ("model", "control")]
    table = _round_table(rows, by)
    paths = {}
    paths["table"], paths["csv"] = write_table(
        table,
        ["model", *extra, "method", "round", "remaining %", "early-stop acc %",
         "final acc %", "early-stop iteration", "n"],
        out,
        formats={"remaining %": "{:.3g}"},
    )  # fmt: skip
    paths.update(_plots(table, extra, f"{rows[0]['model']} on {rows[0]['data']}", out))
    overlap, overlap_fields = _overlaps(store)
    if overlap:
        paths["overlap"], paths["overlap_csv"] = write_table(
            overlap,
            ["model", *overlap_fields, "round", "remaining %", "seeds", "across seeds",
             "random expectation", "with previous round"],
            out.parent / f"{out.name}-overlap",
            formats={"remaining %": "{:.3g}", "across seeds": ".4f",
                     "random expectation": ".4f", "with previous round": ".4f"},
        )  # fmt: skip
    return paths


def _round_table(rows: list[dict], by: list[str]) -> list[dict]:
    """Mean ± std over seeds per configuration (every field but the seed) and round."""
    table = aggregate(
        rows,
        by=[*by, "step"],
        values=["density", "early_stop_test_acc", "test_acc", "early_stop_iteration"],
    )
    others = [k for k in by if k != "control"]
    table.sort(key=lambda r: (describe(r, others), CONTROLS.index(r["control"]), r["step"]))
    for row in table:
        row["round"] = row["step"]
        row["remaining %"] = 100 * row["density_mean"]
        row["method"] = LABELS[row["control"]]
        for key, name in (("early_stop_test_acc", "early-stop acc %"), ("test_acc", "final acc %")):
            row[name] = f"{100 * row[f'{key}_mean']:.2f} ± {100 * row[f'{key}_std']:.2f}"
        row["early-stop iteration"] = (
            f"{row['early_stop_iteration_mean']:.0f} ± {row['early_stop_iteration_std']:.0f}"
        )
    return table


def _plots(table: list[dict], extra: list[str], name: str, out: Path) -> dict[str, Path]:
    """Early-stop accuracy and early-stop iteration against the percent of weights left, a
    line per control and configuration (``extra``: the fields that differ)."""
    accuracy: dict[str, list] = {}
    early: dict[str, list] = {}
    for row in table:
        label = LABELS[row["control"]] + (f", {describe(row, extra)}" if extra else "")
        x = row["remaining %"]
        accuracy.setdefault(label, []).append(
            (x, 100 * row["early_stop_test_acc_mean"], 100 * row["early_stop_test_acc_std"])
        )
        early.setdefault(label, []).append(
            (x, row["early_stop_iteration_mean"], row["early_stop_iteration_std"])
        )
    dense = [r for r in table if r["control"] == "none" and r["step"] == 0]
    paths = {}
    paths["accuracy"] = line_plot(
        accuracy,
        out.parent / f"{out.name}-accuracy.png",
        xlabel="weights remaining (%)",
        ylabel="test accuracy at early stop (%)",
        title=f"Lottery tickets: {name}",
        logx=True,
        reference=100 * dense[0]["early_stop_test_acc_mean"] if dense else None,
    )
    paths["early_stop"] = line_plot(
        early,
        out.parent / f"{out.name}-early-stop.png",
        xlabel="weights remaining (%)",
        ylabel="early-stop iteration",
        title=f"Early-stop iteration: {name}",
        logx=True,
    )
    return paths


def _random_jaccard(masks: Masks) -> float:
    """Expected Jaccard overlap of two independent random masks with the per-layer densities
    of ``masks``: Σ n_l d_l² / Σ n_l (2 d_l - d_l²)."""
    inter = union = 0.0
    for mask in masks.values():
        n = mask.numel()
        d = int(mask.count_nonzero()) / n
        inter += n * d * d
        union += n * (2 * d - d * d)
    return inter / union if union else 1.0


def mask_overlaps(store: RunStore) -> list[dict]:
    """Jaccard overlaps of the finished tickets' masks, per configuration (every field but the
    seed) and round.

    ``across seeds``: mean over pairs of seeds of |m ∩ m'| / |m ∪ m'|; ``random
    expectation``: the same for random masks with those per-layer densities; ``with previous
    round``: mean over seeds of the overlap of round r's mask with round r-1's (for nested
    masks this is the density ratio, a check that no pruned weight came back). Each row also
    holds the model and the configuration fields that differ between the groups.
    """
    return _overlaps(store)[0]


def _overlaps(store: RunStore) -> tuple[list[dict], list[str]]:
    tickets = [r for r in store.runs(EXPERIMENT, status="done") if r["config"]["control"] == "none"]
    configs = [flatten(t["config"]) for t in tickets]
    by, varying = configuration_groups(configs, list(dict.fromkeys(k for c in configs for k in c)))
    fields = [k for k in varying if k != "model"]
    groups: dict[str, list[tuple[dict, dict]]] = {}
    for ticket, config in zip(tickets, configs, strict=True):
        groups.setdefault(describe(config, by), []).append((ticket, config))
    rows = []
    for members in groups.values():
        dirs = [store.run_dir(EXPERIMENT, ticket["run_id"]) for ticket, _ in members]
        config = members[0][1]
        previous: list[Masks] | None = None
        for round_ in range(config["rounds"] + 1):
            masks = [Masks.load(d / _masks_file(round_)) for d in dirs]
            pairs = list(itertools.combinations(masks, 2))
            row = {"model": config["model"], **{k: config.get(k) for k in fields}}
            row.update(
                {
                    "round": round_,
                    "remaining %": 100 * masks[0].density(),
                    "seeds": len(masks),
                    "across seeds": (
                        sum(a.overlap(b) for a, b in pairs) / len(pairs) if pairs else None
                    ),
                    "random expectation": _random_jaccard(masks[0]),
                    "with previous round": (
                        sum(m.overlap(p) for m, p in zip(masks, previous, strict=True)) / len(masks)
                        if previous
                        else None
                    ),
                }
            )
            rows.append(row)
            previous = masks
    return rows, fields


EXPERIMENT_SPEC = register(
    Experiment(
        name=EXPERIMENT,
        help="iterative magnitude pruning (lottery tickets) with its controls",
        config=LotteryConfig,
        axes=(
            Axis("seed", "seeds", int, (0, 1, 2), "seeds"),
            Axis(
                "control",
                "controls",
                str,
                ("none", "reinit", "random"),
                "controls run beside the ticket: reinit, random",
            ),
        ),
        sweep=sweep,
        execute=execute,
        report=report,
    )
)


def run(results: str | Path, configs: list[LotteryConfig], progress: bool = True) -> RunStore:
    """Execute the sweep into the run store at ``results`` (finished runs are skipped, a run
    stopped halfway resumes at its last finished round)."""
    return EXPERIMENT_SPEC.run(results, configs, progress)[0]
