"""``winnow experiment <name>`` and ``winnow experiment report <name>``, generated from the
experiments' descriptions (:mod:`winnow.experiments.registry`): every axis of a sweep is a
comma-separated list option, every other configuration field an option of its own."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from winnow.cli.commands import print_report
from winnow.cli.options import add_config_options, config_from_args, csv_list


def add_experiments(parser: argparse.ArgumentParser) -> None:
    from winnow.experiments import EXPERIMENTS

    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for experiment in EXPERIMENTS.values():
        one = sub.add_parser(
            experiment.name,
            help=experiment.help,
            description=experiment.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for axis in experiment.axes:
            one.add_argument(
                f"--{axis.option}",
                dest=f"axis.{axis.field}",
                metavar=f"{axis.kind.__name__.upper()},...",
                type=lambda text, kind=axis.kind: csv_list(text, kind),
                help=f"{axis.help}, comma-separated (default: {axis.shown_default()})".replace(
                    "%", "%%"
                ),
            )
        add_config_options(one, experiment.config, skip={a.field for a in experiment.axes})
        _common(one)
    report = sub.add_parser("report", help="rebuild tables and plots from the run store")
    report.add_argument("name", choices=tuple(EXPERIMENTS), help="the experiment")
    _results(report)
    _results(sub.add_parser("check", help="check the run store's index against its checksums"))
    _results(
        sub.add_parser("repair", help="rebuild the run store's index from the run directories")
    )


def _results(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results", type=Path, default=Path("results"), help="the run store (default: results)"
    )


def _common(parser: argparse.ArgumentParser) -> None:
    from winnow.experiments.parallel import TRANSPORTS
    from winnow.experiments.store import LEASE_SECONDS

    _results(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    group = parser.add_argument_group(
        "parallel sweeps", "run several runs at once (winnow.experiments.parallel)"
    )
    group.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="runs at once (default: 1, one after another in this process)",
    )  # fmt: skip
    group.add_argument(
        "--engine", choices=("processes", "ray"), default=None,
        help="where runs execute: local processes, or Ray tasks (pip install 'winnow[ray]'); "
        "default: ray with --ray-address, else processes",
    )  # fmt: skip
    group.add_argument(
        "--ray-address", default=None, metavar="auto|HOST:PORT",
        help="send the runs to this existing Ray cluster (default: a local Ray started for "
        "the sweep with --engine ray)",
    )  # fmt: skip
    group.add_argument(
        "--threads-per-run", type=int, default=None, metavar="N",
        help="torch threads in each run, and CPUs a Ray task declares (default: 1 on workers; "
        "a serial sweep keeps torch's)",
    )  # fmt: skip
    group.add_argument(
        "--gpus-per-run", type=float, default=0.0, metavar="G",
        help="GPUs each run gets, so a GPU machine runs one run per GPU (default: 0)",
    )  # fmt: skip
    group.add_argument(
        "--transport", choices=TRANSPORTS, default="auto",
        help="how results reach the store: direct (workers on this machine write into it), "
        "driver (workers send them back, the driver writes them), auto (direct where the "
        "worker sees the store; default)",
    )  # fmt: skip
    group.add_argument(
        "--lease-seconds", type=float, default=LEASE_SECONDS, metavar="S",
        help="how long a run's claim lasts unless renewed: how soon the run of a dead worker "
        f"or driver is redone (default: {LEASE_SECONDS:g})",
    )  # fmt: skip


def _parallel(args: argparse.Namespace):
    from winnow.experiments.parallel import Parallel

    return Parallel(
        workers=args.workers, engine=args.engine, ray_address=args.ray_address,
        threads_per_run=args.threads_per_run, gpus_per_run=args.gpus_per_run,
        transport=args.transport, lease_seconds=args.lease_seconds,
    )  # fmt: skip


def run_experiment(args: argparse.Namespace) -> None:
    from winnow.experiments import EXPERIMENTS

    if args.experiment == "report":
        print_report(EXPERIMENTS[args.name].report(args.results))
        return
    if args.experiment in ("check", "repair"):
        return _check_or_repair(args)
    experiment = EXPERIMENTS[args.experiment]
    given = vars(args)
    axes = {a.option: a.values(given.get(f"axis.{a.field}")) for a in experiment.axes}
    swept = {a.field: a.default[0] for a in experiment.axes}  # placeholders: the sweep sets them
    base = config_from_args(experiment.config, args, **swept)
    fields = {
        f.name: getattr(base, f.name)
        for f in dataclasses.fields(experiment.config)
        if f.init and f.name not in swept
    }
    configs = experiment.sweep(**axes, **fields)
    parallel = _parallel(args)
    where = "" if parallel.kind == "serial" else f" on {parallel.workers} workers ({parallel.kind})"
    print(f"{len(configs)} runs into {args.results}{where} (finished runs are skipped)")
    _, summary = experiment.run(
        args.results, configs, progress=not args.no_progress, parallel=parallel
    )
    paths = experiment.report(args.results)
    print_report(paths)
    if "structures" in paths:
        print(paths["structures"].read_text())
    if summary.failed:
        for run_id, error in summary.failed:
            print(f"failed: {experiment.name}/{run_id}: {error}")
        raise RuntimeError(
            f"{len(summary.failed)} of {len(configs)} runs failed (their tracebacks are in "
            f"{args.results}/{experiment.name}/<run>/traceback.txt); a rerun retries them"
        )


def _check_or_repair(args: argparse.Namespace) -> None:
    from winnow.experiments import check_store, repair_store

    if not (args.results / "winnow.sqlite").is_file():
        raise FileNotFoundError(f"no run store in {args.results} (no winnow.sqlite)")
    if args.experiment == "repair":
        counts = repair_store(args.results)
        print(
            f"index rebuilt from the run directories: {counts['runs']} runs, "
            f"{counts['records']} records"
        )
        return
    problems = check_store(args.results)
    for problem in problems:
        print(problem)
    if problems:
        raise ValueError(
            f"{len(problems)} problem(s) in {args.results}; `winnow experiment repair "
            f"--results {args.results}` rebuilds the index from the run directories"
        )
    print(f"{args.results}: the index and the run directories agree; every checksum holds")
