"""The everyday commands: ``demo``, ``train``, ``prune-at-init``, ``models``, ``datasets``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from winnow import data as datasets
from winnow import distributed, models
from winnow.cli.options import add_config_options, config_from_args, fraction_argument
from winnow.core.masks import Masks
from winnow.io import atomic_write_bytes
from winnow.training import TrainConfig, TrainResult, train

DEVICE_HELP = "where to compute: cpu, cuda, cuda:1, mps (default: cpu)"


def print_report(paths: dict[str, Path]) -> None:
    """Print a report's table and the paths of everything it wrote."""
    print(paths["table"].read_text())
    for name, path in paths.items():
        print(f"{name}: {path}")


# -- demo ------------------------------------------------------------------------------------------
def add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=6, help="pruning rounds (default: 6)")
    parser.add_argument(
        "--rate", type=fraction_argument, default=0.5, metavar="FRACTION",
        help="fraction of the remaining weights pruned per round, 0.5 or 50%% (default: 0.5)",
    )  # fmt: skip
    parser.add_argument(
        "--iterations", type=int, default=2500, help="training steps per round (default: 2500)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument(
        "--results", type=Path, default=Path("results/demo"), help="(default: results/demo)"
    )
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run_demo(args: argparse.Namespace) -> None:
    from winnow.experiments import lottery

    try:
        datasets.load("fashion-mnist", limit=1)
        model_name, data_name = "lenet300", "fashion-mnist"
    except datasets.DatasetNotFoundError as missing:
        print(f"Fashion-MNIST not found ({missing}); using MNIST-1D instead")
        model_name, data_name = "mlp1d", "mnist1d"
    schedule = TrainConfig(iterations=args.iterations, eval_every=max(1, args.iterations // 5))
    configs = lottery.sweep(
        seeds=(args.seed,),
        controls=("none", "reinit"),
        model=model_name,
        data=data_name,
        rounds=args.rounds,
        rate=args.rate,
        train=schedule,
        device=args.device,
    )
    print(
        f"Lottery tickets (Frankle & Carbin 2019): {model_name} on {data_name}, "
        f"{args.rounds} rounds pruning {args.rate:.0%} of the remaining weights per round "
        f"(output layer {args.rate / 2:.0%}), reset to θ₀, with the random-reinit control; "
        f"{args.iterations} steps per round. Runs in {args.results} (finished runs are reused)."
    )
    lottery.run(args.results, configs, progress=not args.no_progress)
    print_report(lottery.report(args.results))


# -- train -----------------------------------------------------------------------------------------
TRAIN_DEFAULTS = TrainConfig(epochs=5.0)
"""What ``winnow train`` uses for the options not given (5 epochs)."""


def add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a name from `winnow models`")
    parser.add_argument("--data", required=True, help="a name from `winnow datasets`")
    parser.add_argument(
        "--root", help="directory of the dataset files (default: the dataset's own place)"
    )
    parser.add_argument(
        "--limit", type=int, help="keep only the first N examples of each split (default: all)"
    )
    parser.add_argument(
        "--masks", type=Path, help="a mask file (Masks.save) to train sparse (default: dense)"
    )
    parser.add_argument(
        "--out", type=Path, help="write the trained weights here, safetensors (default: not)"
    )
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--nproc", type=int, default=1, metavar="N",
        help="data-parallel training in N processes on this machine (torch.distributed: gloo "
        "on cpu, nccl on cuda, one GPU each): every process computes its share of each "
        "--batch-size batch, which stays the global batch and must be divisible by N "
        "(default: 1)",
    )  # fmt: skip
    add_config_options(parser, TrainConfig, TRAIN_DEFAULTS)


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


def run_train(args: argparse.Namespace) -> None:
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    config = config_from_args(TrainConfig, args, TRAIN_DEFAULTS)
    if nproc > 1:
        if distributed.launched():
            raise ValueError("--nproc asked inside a process that torchrun started already")
        if config.batch_size % nproc:
            raise ValueError(
                f"--batch-size {config.batch_size} is the global batch: it must be divisible "
                f"by --nproc {nproc}"
            )
        print(f"data-parallel training in {nproc} processes (rank 0 reports)")
        distributed.launch(run_train, nproc, (argparse.Namespace(**{**vars(args), "nproc": 1}),))
        return
    main = distributed.is_main()  # torchrun or --nproc: rank 0 prints and writes
    say = print if main else _silent
    data = datasets.load(args.data, root=args.root, seed=config.seed, limit=args.limit)
    masks = Masks.load(args.masks) if args.masks else None
    if masks is not None:
        say(f"training sparse: {masks}")
    model = models.create_for(args.model, data, seed=config.seed)
    say(f"{data.summary()}")
    params = sum(p.numel() for p in model.parameters())
    say(f"model {args.model}: {params:,} parameters; {config.optimizer} lr {config.lr}")
    result = train(
        model, data, config, masks=masks, device=args.device,
        progress=not args.no_progress, description=args.model,
    )  # fmt: skip
    say(_results_table(result))
    say(f"{result.iterations} iterations in {result.seconds:.1f} s")
    if args.out and main:
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(args.out, save(state, metadata={"model": args.model}))
        print(f"weights written to {args.out}")


def _silent(*args, **kwargs) -> None:
    pass


# -- prune-at-init -------------------------------------------------------------------------------
def add_prune_at_init(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a name from `winnow models`")
    parser.add_argument("--data", required=True, help="a name from `winnow datasets`")
    parser.add_argument(
        "--root", help="directory of the dataset files (default: the dataset's own place)"
    )
    parser.add_argument("--method", required=True, help="a criterion: random, snip, synflow, ...")
    parser.add_argument(
        "--density", type=fraction_argument, required=True, metavar="FRACTION",
        help="fraction of the weights kept: 0.1 or 10%%",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, help="iterative rounds (default: 100 for synflow, else 1)"
    )
    parser.add_argument(
        "--scope", choices=("global", "layer"), default="global",
        help="one threshold for all layers, or the same density in each (default: global)",
    )  # fmt: skip
    parser.add_argument(
        "--min-per-layer", type=int, default=0,
        help="keep at least this many weights in every layer, a guard against collapse "
        "(default: 0)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the model, the data and the masks (default: 0)"
    )
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--out", type=Path, help="write the masks here (default: not written)")


def run_prune_at_init(args: argparse.Namespace) -> None:
    from winnow.analysis import gradient_norm
    from winnow.criteria import lookup
    from winnow.schedules import prune_at_init

    data = datasets.load(args.data, root=args.root, seed=args.seed)
    model = models.create_for(args.model, data, seed=args.seed).to(args.device)
    options = {"seed": args.seed} if lookup(args.method).takes_seed() else {}
    masks = prune_at_init(
        model, args.method, args.density, data, rounds=args.rounds, scope=args.scope,
        min_per_layer=args.min_per_layer, progress=True, **options,
    )  # fmt: skip
    print(masks.summary())
    print(
        f"gradient norm: dense {gradient_norm(model, data):.4g}, "
        f"pruned {gradient_norm(model, data, masks):.4g}"
    )
    if args.out:
        masks.cpu().save(args.out)
        print(f"masks written to {args.out}")


# -- models, datasets ------------------------------------------------------------------------------
def run_models(args: argparse.Namespace) -> None:
    for name in models.available():
        with torch.device("meta"):
            model = models.create(name, input_size=40 if name.endswith("1d") else 28, seed=None)
        params = sum(p.numel() for p in model.parameters())
        doc = (type(model).__doc__ or "").strip().splitlines()[0]
        print(f"{name:<10} {params:>12,} params (1x28x28 or 1x40 input, 10 classes)  {doc}")


def run_datasets(args: argparse.Namespace) -> None:
    root = datasets.FASHION_MNIST_ROOT
    missing = "" if root.is_dir() else " (missing: apt-get install dataset-fashion-mnist)"
    notes = {
        "fashion-mnist": f"IDX files in {root}{missing}",
        "mnist": f"IDX files in --root (default {datasets.MNIST_ROOT})",
        "mnist1d": "generated by the mnist1d package (no download)",
        "digits": "scikit-learn's bundled 8x8 digits",
        "cifar10": "python pickle batches in --root (cifar-10-batches-py)",
        "synthetic": "seeded Gaussian classes, for tests",
    }
    for name in datasets.available():
        print(f"{name:<14} {notes.get(name, '')}")
