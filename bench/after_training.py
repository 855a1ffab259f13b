"""Pruning after and during training on Fashion-MNIST: the survey's methods side by side.

For each model and seed: train the dense network (Adam 1.2e-3, batch 60, --epochs), then for
each target sparsity (90, 95, 98% by default):

- ``magnitude``: one-shot global magnitude pruning, no fine-tuning;
- ``magnitude+ft``: the same, then --finetune epochs of training with the mask enforced;
- ``obd``: one-shot OBD (θ² diag(F) / 2, 1,000 samples), no fine-tuning; ``obd+ft``;
- ``woodfisher``: one-shot OBS with the block-diagonal empirical Fisher (block 128, 1,000
  samples, damping 1e-5) and the OBS update of the remaining weights; ``woodfisher+ft``;
- ``gradual``: Zhu & Gupta's polynomial schedule from 10% to 70% of a training run as long
  as the dense one, pruning every 100 steps, from the dense initialisation;
- ``l0``: L0 hard-concrete gates trained from the dense initialisation (Louizos et al. 2018),
  thresholded to the sparsity by P(gate ≠ 0), then fine-tuned;
- ``svd``: sparse variational dropout (Molchanov et al. 2017) from the trained dense network
  for --finetune epochs, thresholded to the sparsity by log α.

Prints a table of test accuracy (mean ± std over seeds) and the seconds each method took, and
writes it to bench/results/after-training-<model>.md.

    python bench/after_training.py [--models lenet300,lenet5] [--seeds 0,1] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

import winnow
from winnow.experiments.report import write_table
from winnow.regularizers import L0HardConcrete
from winnow.schedules import GradualPruner, obs_prune
from winnow.variational import KLPenalty, from_svdo, svdo_layers, to_svdo


def accuracy(model, data) -> float:
    return winnow.evaluate(model, data.x_test, data.y_test)[1]


def finetune(model, masks, data, epochs, seed):
    config = winnow.TrainConfig(epochs=epochs, lr=1.2e-3, seed=seed + 1)
    winnow.train(model, data, config, masks=masks)
    return model


def one_shot(name, dense, data, density, seed, finetune_epochs):
    """(accuracy without fine-tuning, accuracy with it, seconds of each) for one criterion."""
    start = time.perf_counter()
    if name == "woodfisher":
        pruned, masks = obs_prune(dense, density, data, samples=1000, block_size=128, damp=1e-5)
    else:
        options = {"samples": 1000} if name == "obd" else {}
        masks = winnow.select(winnow.score(dense, name, data, **options), density)
        pruned = masks.apply(copy.deepcopy(dense))
    prune_seconds = time.perf_counter() - start
    plain = accuracy(pruned, data)
    start = time.perf_counter()
    tuned = accuracy(finetune(pruned, masks, data, finetune_epochs, seed), data)
    return plain, tuned, prune_seconds, prune_seconds + time.perf_counter() - start


def gradual(model_name, data, density, seed, epochs):
    model = winnow.models.create_for(model_name, data, seed=seed)
    config = winnow.TrainConfig(epochs=epochs, lr=1.2e-3, seed=seed)
    total = config.total_iterations(len(winnow.data.Batches(data.x_train, data.y_train, 60)))
    begin = (total // 10) // 100 * 100
    end = begin + ((7 * total // 10 - begin) // 100) * 100
    pruner = GradualPruner(1 - density, begin=begin, end=end, frequency=100)
    winnow.train(model, data, config, pruner=pruner)
    return accuracy(model, data)


def l0(model_name, data, densities, seed, epochs, finetune_epochs):
    model = winnow.models.create_for(model_name, data, seed=seed)
    gated, reg = L0HardConcrete.attach(model, strength=0.05, init_drop=0.1, seed=seed)
    winnow.train(
        gated, data, winnow.TrainConfig(epochs=epochs, lr=1.2e-3, seed=seed), regularizer=reg
    )
    scores = reg.scores(gated)
    plain, _ = L0HardConcrete.finalize(gated)
    out = {}
    for density in densities:
        masks = winnow.select(scores, density)
        tuned = finetune(masks.apply(copy.deepcopy(plain)), masks, data, finetune_epochs, seed)
        out[density] = accuracy(tuned, data)
    return out


def sparse_vd(dense, data, densities, seed, epochs):
    model = to_svdo(dense)
    penalty = KLPenalty(1 / len(data.x_train), warmup=500)
    winnow.train(
        model, data, winnow.TrainConfig(epochs=epochs, lr=1e-3, seed=seed + 2), regularizer=penalty
    )
    scores = {f"{n}.weight": -layer.log_alpha().detach() for n, layer in svdo_layers(model).items()}
    plain, _ = from_svdo(model, threshold=float("inf"))
    natural = sum(int((-s < 3).sum()) for s in scores.values()) / sum(
        s.numel() for s in scores.values()
    )
    out = {}
    for density in densities:
        masks = winnow.select(scores, density)
        out[density] = accuracy(masks.apply(copy.deepcopy(plain)), data)
    return out, natural


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet300,lenet5")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--sparsities", default="90,95,98")
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--finetune", type=float, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    seeds = [int(s) for s in args.seeds.split(",")]
    densities = [1 - float(s) / 100 for s in args.sparsities.split(",")]
    for model_name in args.models.split(","):
        acc: dict[tuple[str, float], list[float]] = defaultdict(list)
        seconds: dict[str, list[float]] = defaultdict(list)
        for seed in seeds:
            data = winnow.data.load("fashion-mnist", seed=seed)
            dense = winnow.models.create_for(model_name, data, seed=seed)
            start = time.perf_counter()
            winnow.train(dense, data, winnow.TrainConfig(epochs=args.epochs, lr=1.2e-3, seed=seed))
            seconds["dense"].append(time.perf_counter() - start)
            acc[("dense", 1.0)].append(accuracy(dense, data))
            for density in densities:
                for name in ("magnitude", "obd", "woodfisher"):
                    plain, tuned, t_plain, t_tuned = one_shot(
                        name, dense, data, density, seed, args.finetune
                    )
                    acc[(name, density)].append(plain)
                    acc[(f"{name}+ft", density)].append(tuned)
                    seconds[name].append(t_plain)
                    seconds[f"{name}+ft"].append(t_tuned)
                start = time.perf_counter()
                acc[("gradual", density)].append(
                    gradual(model_name, data, density, seed, args.epochs)
                )
                seconds["gradual"].append(time.perf_counter() - start)
                print(
                    f"{model_name} seed {seed} density {density:g}: "
                    + ", ".join(f"{k[0]} {v[-1]:.4f}" for k, v in acc.items() if k[1] == density)
                )
            start = time.perf_counter()
            for density, value in l0(
                model_name, data, densities, seed, args.epochs, args.finetune
            ).items():
                acc[("l0+ft", density)].append(value)
            seconds["l0+ft"].append((time.perf_counter() - start) / len(densities))
            start = time.perf_counter()
            svd, natural = sparse_vd(dense, data, densities, seed, args.finetune)
            for density, value in svd.items():
                acc[("svd", density)].append(value)
            seconds["svd"].append((time.perf_counter() - start) / len(densities))
            print(f"  sparse VD: {1 - natural:.1%} of the weights have log α > 3")
        rows = []
        methods = [
            "magnitude",
            "magnitude+ft",
            "obd",
            "obd+ft",
            "woodfisher",
            "woodfisher+ft",
            "gradual",
            "l0+ft",
            "svd",
        ]
        for method in methods:
            row = {"method": method, "seconds": f"{statistics.mean(seconds[method]):.1f}"}
            for density in densities:
                values = acc[(method, density)]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                row[f"{100 * (1 - density):g}% sparse"] = (
                    f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"
                )
            rows.append(row)
        dense_acc = acc[("dense", 1.0)]
        columns = ["method", *[f"{100 * (1 - d):g}% sparse" for d in densities], "seconds"]
        tag = f"-{args.tag}" if args.tag else ""
        out = Path(__file__).parent / "results" / f"after-training-{model_name}{tag}"
        md, _ = write_table(rows, columns, out)
        print(
            f"\n{model_name} on Fashion-MNIST, dense {100 * statistics.mean(dense_acc):.2f}% "
            f"({len(seeds)} seeds, {statistics.mean(seconds['dense']):.0f} s to train)"
        )
        print(md.read_text())


if __name__ == "__main__":
    main()
