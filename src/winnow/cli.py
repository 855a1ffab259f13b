"""The ``winnow`` command.

    winnow demo                       the main job (what ``make demo`` runs): a small
                                      lottery-ticket experiment
    winnow experiment lottery --rounds 18 --rate 0.2 --seeds 0,1,2
    winnow train --model lenet300 --data fashion-mnist --epochs 5
    winnow models | winnow datasets | winnow --version

Errors are reported as one line (``winnow: error: ...``) with exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import winnow
from winnow import data as datasets
from winnow import models
from winnow.core.masks import Masks
from winnow.formats import cli as formats_cli
from winnow.io import atomic_write_bytes
from winnow.training import OPTIMIZERS, TrainConfig, TrainResult, train


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, help="training budget in epochs (default 5)")
    budget.add_argument("--iterations", type=int, help="training budget in iterations")
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    parser.add_argument("--lr", type=float, default=1.2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="seeds init, data order and split")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="winnow", description="Pruning neural networks in PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"winnow {winnow.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="the main job: a small lottery-ticket experiment on LeNet-300-100"
    )
    demo.add_argument("--rounds", type=int, default=6)
    demo.add_argument("--rate", type=float, default=0.5, help="fraction pruned per round")
    demo.add_argument("--iterations", type=int, default=2500, help="training steps per round")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--results", type=Path, default=Path("results/demo"))
    demo.add_argument("--no-progress", action="store_true")

    tr = sub.add_parser("train", help="train a model of the zoo on a dataset")
    tr.add_argument("--model", required=True, help="a name from `winnow models`")
    tr.add_argument("--data", required=True, help="a name from `winnow datasets`")
    tr.add_argument("--root", help="directory of the dataset files")
    tr.add_argument("--limit", type=int, help="keep only the first N examples of each split")
    tr.add_argument("--masks", type=Path, help="a mask file (Masks.save) to train sparse")
    tr.add_argument("--out", type=Path, help="write the trained weights here (safetensors)")
    _add_training_options(tr)

    pai = sub.add_parser("prune-at-init", help="prune a freshly initialised model (SNIP, ...)")
    pai.add_argument("--model", required=True, help="a name from `winnow models`")
    pai.add_argument("--data", required=True, help="a name from `winnow datasets`")
    pai.add_argument("--root", help="directory of the dataset files")
    pai.add_argument("--method", required=True, help="random, magnitude, snip, grasp, synflow")
    pai.add_argument("--density", type=float, required=True, help="fraction kept, in [0, 1]")
    pai.add_argument("--rounds", type=int, help="iterative rounds (default: 100 for synflow)")
    pai.add_argument("--scope", choices=("global", "layer"), default="global")
    pai.add_argument("--min-per-layer", type=int, default=0, help="guard against collapse")
    pai.add_argument("--seed", type=int, default=0)
    pai.add_argument("--out", type=Path, help="write the masks here (safetensors)")

    exp = sub.add_parser("experiment", help="run or report a stored, resumable experiment")
    exp_sub = exp.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    ai = exp_sub.add_parser("at-init", help="methods x densities x seeds, pruned at init")
    ai.add_argument("--model", default="lenet300")
    ai.add_argument("--data", default="fashion-mnist")
    ai.add_argument("--methods", default="random,magnitude,snip,grasp,synflow")
    ai.add_argument(
        "--densities", default="10,5,2,1,0.5,0.2", help="percent of weights kept, comma-separated"
    )
    ai.add_argument("--seeds", default="0,1,2")
    ai.add_argument("--controls", default="none,shuffle", help="none, shuffle, reinit")
    ai.add_argument("--epochs", type=float, default=5)
    ai.add_argument("--limit", type=int, help="keep only the first N examples of each split")
    ai.add_argument("--results", type=Path, default=Path("results"))
    ai.add_argument("--no-progress", action="store_true")
    lt = exp_sub.add_parser("lottery", help="iterative magnitude pruning with its controls")
    lt.add_argument("--model", default="lenet300")
    lt.add_argument("--data", default="fashion-mnist")
    lt.add_argument("--rounds", type=int, default=18, help="pruning rounds after the dense one")
    lt.add_argument(
        "--rate",
        type=float,
        default=0.2,
        help="fraction of the remaining weights"
        " pruned per round (fully connected layers, or all with --scope global)",
    )
    lt.add_argument("--conv-rate", type=float, help="rate for convolutions (default --rate)")
    lt.add_argument(
        "--output-rate", type=float, help="rate for the output layer (default --rate / 2)"
    )
    lt.add_argument("--scope", choices=("layer", "global"), default="layer")
    lt.add_argument("--rewind", type=int, default=0, help="rewind iteration k (0: reset to θ₀)")
    lt.add_argument("--seeds", default="0,1,2")
    lt.add_argument("--controls", default="none,reinit,random", help="none, reinit, random")
    budget = lt.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, default=5, help="training per round")
    budget.add_argument("--iterations", type=int, help="training per round, in steps")
    lt.add_argument("--batch-size", type=int, default=60)
    lt.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    lt.add_argument("--lr", type=float, default=1.2e-3)
    lt.add_argument("--eval-every", type=int, default=0, help="iterations (0: every epoch)")
    lt.add_argument("--limit", type=int, help="keep only the first N examples of each split")
    lt.add_argument("--results", type=Path, default=Path("results"))
    lt.add_argument("--no-progress", action="store_true")
    from winnow.experiments.scratch import add_command as add_scratch_command

    add_scratch_command(exp_sub)
    rep = exp_sub.add_parser("report", help="rebuild tables and plots from the run store")
    rep.add_argument("name", choices=("at-init", "lottery", "scratch"))
    rep.add_argument("--results", type=Path, default=Path("results"))

    sub.add_parser("models", help="list the model zoo")
    sub.add_parser("datasets", help="list the datasets and whether their files are here")
    formats_cli.add_commands(sub)
    return parser


def _results_table(result: TrainResult) -> str:
    header = f"{'iteration':>9}  {'train loss':>10}  {'val acc':>7}  {'test acc':>8}"
    lines = [header, "-" * len(header)]
    for row in result.history:
        val = "-" if row["val_acc"] is None else f"{row['val_acc']:.2%}"
        lines.append(
            f"{row['iteration']:>9}  {row['train_loss']:>10.4f}  {val:>7}  {row['test_acc']:>8.2%}"
        )
    best = result.early_stop
    lines.append(
        f"early stop (min val loss): iteration {best['iteration']}, "
        f"test accuracy {best['test_acc']:.2%}"
    )
    return "\n".join(lines)


def _train(
    model_name: str,
    data: datasets.DataSplits,
    config: TrainConfig,
    device: str,
    progress: bool,
    masks: Masks | None = None,
) -> tuple[torch.nn.Module, TrainResult]:
    model = models.create_for(model_name, data, seed=config.seed)
    print(f"{data.summary()}")
    params = sum(p.numel() for p in model.parameters())
    print(f"model {model_name}: {params:,} parameters; {config.optimizer} lr {config.lr}")
    result = train(
        model, data, config, masks=masks, device=device, progress=progress, description=model_name
    )
    print(_results_table(result))
    print(f"{result.iterations} iterations in {result.seconds:.1f} s")
    return model, result


def _cmd_demo(args: argparse.Namespace) -> None:
    from winnow.experiments import lottery

    try:
        datasets.load("fashion-mnist", limit=1)
        model_name, data_name = "lenet300", "fashion-mnist"
    except datasets.DatasetNotFoundError as missing:
        print(f"Fashion-MNIST not found ({missing}); using MNIST-1D instead")
        model_name, data_name = "mlp1d", "mnist1d"
    configs = lottery.sweep(
        seeds=(args.seed,),
        controls=("none", "reinit"),
        model=model_name,
        data=data_name,
        rounds=args.rounds,
        rate=args.rate,
        iterations=args.iterations,
        eval_every=max(1, args.iterations // 5),
    )
    print(
        f"Lottery tickets (Frankle & Carbin 2019): {model_name} on {data_name}, "
        f"{args.rounds} rounds pruning {args.rate:.0%} of the remaining weights per round "
        f"(output layer {args.rate / 2:.0%}), reset to θ₀, with the random-reinit control; "
        f"{args.iterations} steps per round. Runs in {args.results} (finished runs are reused)."
    )
    lottery.run(args.results, configs, progress=not args.no_progress)
    _print_report(lottery.report(args.results))


def _cmd_train(args: argparse.Namespace) -> None:
    data = datasets.load(args.data, root=args.root, seed=args.seed, limit=args.limit)
    config = TrainConfig(
        epochs=None if args.iterations is not None else (args.epochs or 5),
        iterations=args.iterations,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    masks = Masks.load(args.masks) if args.masks else None
    if masks is not None:
        print(f"training sparse: {masks}")
    model, _ = _train(args.model, data, config, args.device, not args.no_progress, masks)
    if args.out:
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(args.out, save(state, metadata={"model": args.model}))
        print(f"weights written to {args.out}")


def _cmd_models(args: argparse.Namespace) -> None:
    for name in models.available():
        model = models.create(name, input_size=40 if name.endswith("1d") else 28, seed=0)
        params = sum(p.numel() for p in model.parameters())
        doc = (type(model).__doc__ or "").strip().splitlines()[0]
        print(f"{name:<10} {params:>12,} params (1x28x28 or 1x40 input, 10 classes)  {doc}")


def _cmd_datasets(args: argparse.Namespace) -> None:
    notes = {
        "fashion-mnist": f"IDX files in {datasets.FASHION_MNIST_ROOT}"
        + (
            ""
            if datasets.FASHION_MNIST_ROOT.is_dir()
            else " (missing: apt-get install dataset-fashion-mnist)"
        ),
        "mnist": f"IDX files in --root (default {datasets.MNIST_ROOT})",
        "mnist1d": "generated by the mnist1d package (no download)",
        "digits": "scikit-learn's bundled 8x8 digits",
        "cifar10": "python pickle batches in --root (cifar-10-batches-py)",
        "synthetic": "seeded Gaussian classes, for tests",
    }
    for name in datasets.available():
        print(f"{name:<14} {notes.get(name, '')}")


def csv_list(text: str, kind=str) -> tuple:
    """``"a, b,c"`` as ``(kind(a), kind(b), kind(c))``; a clear ValueError otherwise."""
    try:
        return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a comma-separated list") from None


def _cmd_prune_at_init(args: argparse.Namespace) -> None:
    from winnow.analysis import gradient_norm
    from winnow.schedules import prune_at_init

    data = datasets.load(args.data, root=args.root, seed=args.seed)
    model = models.create_for(args.model, data, seed=args.seed)
    masks = prune_at_init(
        model,
        args.method,
        args.density,
        data,
        rounds=args.rounds,
        scope=args.scope,
        min_per_layer=args.min_per_layer,
        progress=True,
    )
    print(masks.summary())
    print(
        f"gradient norm: dense {gradient_norm(model, data):.4g}, "
        f"pruned {gradient_norm(model, data, masks):.4g}"
    )
    if args.out:
        masks.save(args.out)
        print(f"masks written to {args.out}")


def _print_report(paths: dict[str, Path]) -> None:
    print(paths["table"].read_text())
    for name, path in paths.items():
        print(f"{name}: {path}")


def _cmd_lottery(args: argparse.Namespace) -> None:
    from winnow.experiments import lottery

    configs = lottery.sweep(
        seeds=csv_list(args.seeds, int),
        controls=csv_list(args.controls),
        model=args.model,
        data=args.data,
        rounds=args.rounds,
        rate=args.rate,
        conv_rate=args.conv_rate,
        output_rate=args.output_rate,
        scope=args.scope,
        rewind=args.rewind,
        epochs=args.epochs,
        iterations=args.iterations,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        eval_every=args.eval_every,
        data_limit=args.limit,
    )
    print(f"{len(configs)} runs into {args.results} (finished runs are skipped)")
    lottery.run(args.results, configs, progress=not args.no_progress)
    _print_report(lottery.report(args.results))


def _cmd_experiment(args: argparse.Namespace) -> None:
    from winnow.experiments import at_init, lottery

    if args.experiment == "lottery":
        return _cmd_lottery(args)
    if "scratch" in (args.experiment, getattr(args, "name", None)):
        from winnow.experiments import scratch

        return scratch.command(args)
    if args.experiment == "report":
        paths = (lottery if args.name == "lottery" else at_init).report(args.results)
    else:
        configs = at_init.sweep(
            model=args.model,
            data=args.data,
            methods=csv_list(args.methods),
            densities=tuple(d / 100 for d in csv_list(args.densities, float)),
            seeds=csv_list(args.seeds, int),
            controls=csv_list(args.controls),
            epochs=args.epochs,
            data_limit=args.limit,
        )
        print(f"{len(configs)} runs into {args.results} (finished runs are skipped)")
        at_init.run(args.results, configs, progress=not args.no_progress)
        paths = at_init.report(args.results)
    _print_report(paths)


COMMANDS = {
    "demo": _cmd_demo,
    "train": _cmd_train,
    "prune-at-init": _cmd_prune_at_init,
    "experiment": _cmd_experiment,
    "models": _cmd_models,
    "datasets": _cmd_datasets,
    **formats_cli.COMMANDS,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``winnow`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    try:
        COMMANDS[args.command](args)
    except (ValueError, KeyError, FileNotFoundError, ImportError, OSError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"winnow: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("winnow: interrupted", file=sys.stderr)
        return 130
    if args.command in ("demo", "train"):
        print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
