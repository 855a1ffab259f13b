"""Structured pruning for real: measured latency, accuracy at equal FLOPs, cost of the search.

Three parts, each printing its figures with the conditions (torch version, threads, batch):

1. ``latency``: VGG-11 (full widths, 3x32x32 input by default) at batch 64 on the CPU, dense
   against the networks that ``winnow.structured.shrink`` builds at 50%, 30% and 25% of the
   dense FLOPs: uniform widths, uniform widths rounded up to a multiple of 8, and a
   non-uniform structure (a global threshold on seeded random channel scores with a random
   scale per layer). Forward passes are timed interleaved (dense, then each pruned network,
   repeated) and the median is kept; the speedup is set against the FLOPs ratio (target:
   speedup >= 0.9 x dense/pruned FLOPs). Each network is timed twice over: as the eager
   module, and as PyTorch prepares it for CPU inference (``torch.fx.experimental.optimization.
   optimize_for_inference``: BatchNorm folded into the convolutions, oneDNN layouts kept from
   layer to layer; checked to give the eager outputs). When ``torch_pruning`` (1.6.1,
   ``pip install torch-pruning==1.6.1 --no-deps``) is importable, its magnitude pruner prunes
   the same model to the same budget and is timed in the same loop, and its MAC counter is
   set against winnow's.
2. ``accuracy``: the scratch experiment (``winnow.experiments.scratch``): a dense reference,
   then Pruning from Scratch, network slimming, L1-norm filter pruning and uniform scaling at
   each budget and seed, each structure trained from a fresh initialisation (Scratch-B).
   Runs are stored under ``--results`` as they finish, so an interrupted benchmark resumes.
3. ``cost``: from the same runs, the seconds the gate search took (10 epochs of gate learning
   plus the threshold search) against the seconds of one full dense training.

    python bench/structured.py latency [--repeats 20] [--forms eager,inference]
    python bench/structured.py accuracy [--model vgg11 --width 0.25 --epochs 10 --seeds 0,1]
    python bench/structured.py all      # both, then the cost
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import time
from dataclasses import replace

import torch
from torch.fx.experimental.optimization import optimize_for_inference

from winnow import models
from winnow.experiments import scratch as experiment
from winnow.experiments.store import RunStore
from winnow.options import parse_fraction
from winnow.structured import (
    analyse,
    count,
    measure_latency,
    shrink,
    threshold_for_budget,
    uniform_structure,
)


def conditions(batch: int) -> str:
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, "
        f"{torch.backends.mkldnn.is_available() and 'oneDNN' or 'no oneDNN'}"
    )


def random_nonuniform_scores(analysis, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for group in analysis.prunable():
        scale = 0.5 + torch.rand((), generator=gen)
        scores[group.name] = scale * torch.rand(group.size, generator=gen)
    return scores


def torch_pruning_model(model, shape, budget):
    """Torch-Pruning's magnitude pruner (L1, per layer) on a copy, at ``budget`` of the MACs."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None, None
    example = torch.zeros(1, *shape)
    dense_macs, _ = tp.utils.count_ops_and_params(model, example)
    lo, hi, best = 0.0, 1.0, None
    for _ in range(12):
        ratio = (lo + hi) / 2
        pruned = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(
            pruned,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=[pruned.classifier],
        )
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(pruned, example)
        if macs > budget * dense_macs:
            lo = ratio
        else:
            hi, best = ratio, (pruned, macs)
    return best


def latency(args: argparse.Namespace) -> None:
    shape = (args.channels, args.size, args.size)
    dense = models.create(args.model, in_channels=args.channels, input_size=args.size).eval()
    analysis = analyse(dense, shape)
    dense_counts = count(dense, shape)
    print(f"\n== latency: {args.model} on {shape}, {conditions(args.batch)}")
    print(f"dense: {dense_counts.flops / 1e6:.1f} MFLOPs (MACs), {dense_counts.params:,} params")
    candidates = {"dense": (dense, 1.0)}
    for budget in args.budgets:
        structures = {
            "uniform": uniform_structure(analysis, budget),
            "uniform/8": uniform_structure(analysis, budget, round_to=8),
            "non-uniform": threshold_for_budget(
                random_nonuniform_scores(analysis, args.seed), analysis, budget
            ),
        }
        for label, structure in structures.items():
            small, _ = shrink(dense, structure.masks, shape)
            measured = count(small, shape).flops
            assert measured == structure.flops
            candidates[f"{label} {budget:.0%}"] = (small.eval(), measured / dense_counts.flops)
        tp_model = torch_pruning_model(dense, shape, budget)
        if tp_model is not None and tp_model[0] is not None:
            pruned = tp_model[0].eval()
            ours = count(pruned, shape).flops
            print(
                f"torch-pruning {budget:.0%}: its MACs {tp_model[1] / 1e6:.2f} M, winnow's count"
                f" of the same network {ours / 1e6:.2f} M"
            )
            candidates[f"torch-pruning {budget:.0%}"] = (pruned, ours / dense_counts.flops)
    if "torch-pruning 50%" not in candidates:
        print("torch-pruning not importable: pip install torch-pruning==1.6.1 --no-deps")
    else:
        print(f"torch-pruning {importlib.metadata.version('torch-pruning')}")
    forms = {"eager": candidates}
    if "inference" in args.forms:
        # PyTorch's own CPU inference preparation, applied alike to every network: BatchNorm
        # folded into the convolutions, oneDNN (mkldnn) layouts kept between layers
        forms["inference"] = {
            label: (optimize_for_inference(copy.deepcopy(model)), ratio)
            for label, (model, ratio) in candidates.items()
        }
        probe = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            worst = max(
                float((forms["inference"][label][0](probe) - model(probe)).abs().max())
                for label, (model, _) in candidates.items()
            )
        print(f"prepared networks agree with their eager forms: max |difference| {worst:.2e}")
    started = time.perf_counter()
    timed = {
        (form, label): model
        for form, members in forms.items()
        if form in args.forms
        for label, (model, _) in members.items()
    }
    times = measure_latency(
        timed, shape, batch_size=args.batch, repeats=args.repeats, warmup=args.warmup
    )
    print(f"{args.repeats} interleaved timed passes each ({time.perf_counter() - started:.0f} s)")
    for form, members in forms.items():
        if form not in args.forms:
            continue
        print(f"\n{form}:")
        print(
            f"{'network':<22} {'FLOPs %':>8} {'ms':>9} {'speedup':>8} {'FLOPs ratio':>11}"
            f" {'speedup / FLOPs ratio':>22}"
        )
        for label, (_, ratio) in members.items():
            speedup = times[form, "dense"] / times[form, label]
            print(
                f"{label:<22} {100 * ratio:>8.1f} {1000 * times[form, label]:>9.2f}"
                f" {speedup:>8.2f} {1 / ratio:>11.2f} {speedup * ratio:>22.2f}"
            )


def accuracy(args: argparse.Namespace) -> None:
    configs = experiment.sweep(
        model=args.model,
        data=args.data,
        budgets=tuple(args.budgets),
        seeds=tuple(args.seeds),
        train=replace(experiment.ScratchConfig().train, epochs=args.epochs),
        width=args.width,
        gate_epochs=args.gate_epochs,
        data_limit=args.limit,
    )
    print(f"\n== accuracy: {len(configs)} runs into {args.results}, {conditions(64)}")
    started = time.perf_counter()
    experiment.run(args.results, configs, progress=not args.no_progress)
    paths = experiment.report(args.results)
    print(paths["table"].read_text())
    if "structures" in paths:
        print(paths["structures"].read_text())
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"{time.perf_counter() - started:.0f} s")


def cost(args: argparse.Namespace) -> None:
    rows = RunStore(args.results).records(experiment.EXPERIMENT, kind="result")
    dense = {r["seed"]: r["train_seconds"] for r in rows if r["method"] == "dense"}
    print("\n== cost of the structure search vs one full dense training (same machine, same runs)")
    for row in rows:
        if row["method"] == "dense" or row["seed"] not in dense:
            continue
        full, search = dense[row["seed"]], row["search_seconds"]
        line = (
            f"{row['method']:<10} seed {row['seed']}, budget {row['budget']:.0%}: search"
            f" {search:.0f} s, dense training {full:.0f} s ({row['epochs']:g} epochs):"
            f" {search / full:.3f} of one training"
        )
        if row["method"] == "scratch":
            per_epoch = (search / row["gate_epochs"]) / (full / row["epochs"])
            line += (
                f"; one gate epoch = {per_epoch:.2f} training epoch, so {row['gate_epochs']:g}"
                f" gate epochs against the paper's 160-epoch schedule would be"
                f" {per_epoch * row['gate_epochs'] / 160:.4f} of one training"
            )
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("latency", "accuracy", "all"), nargs="?", default="all")
    parser.add_argument(
        "--budgets", default="50%,30%,25%", help="fractions of the dense FLOPs (0.5 or 50%%)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    latency_options = parser.add_argument_group("latency")
    latency_options.add_argument("--latency-model", dest="lat_model", default="vgg11")
    latency_options.add_argument("--channels", type=int, default=3)
    latency_options.add_argument("--size", type=int, default=32)
    latency_options.add_argument("--batch", type=int, default=64)
    latency_options.add_argument("--repeats", type=int, default=20)
    latency_options.add_argument("--warmup", type=int, default=3)
    latency_options.add_argument(
        "--forms",
        default="eager,inference",
        help="eager modules, and/or each prepared by torch.fx's optimize_for_inference",
    )
    acc = parser.add_argument_group("accuracy")
    acc.add_argument("--model", default="vgg11")
    acc.add_argument("--data", default="fashion-mnist")
    acc.add_argument(
        "--accuracy-budgets", default="50%,30%", help="fractions of the dense FLOPs (0.5 or 50%%)"
    )
    acc.add_argument("--width", type=float, default=0.25, help="multiplier of the zoo widths")
    acc.add_argument("--epochs", type=float, default=10, help="the dense schedule")
    acc.add_argument("--gate-epochs", type=float, default=10)
    acc.add_argument("--seeds", default="0,1")
    acc.add_argument("--limit", type=int, help="keep only the first N examples of each split")
    acc.add_argument("--results", default="results/bench-scratch")
    acc.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.part in ("latency", "all"):
        lat = argparse.Namespace(**vars(args))
        lat.model = args.lat_model
        lat.budgets = [parse_fraction(b) for b in args.budgets.split(",")]
        latency(lat)
    if args.part in ("accuracy", "all"):
        run = argparse.Namespace(**vars(args))
        run.budgets = [parse_fraction(b) for b in args.accuracy_budgets.split(",")]
        run.seeds = seeds
        accuracy(run)
        cost(run)


if __name__ == "__main__":
    main()
