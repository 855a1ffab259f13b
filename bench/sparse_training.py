"""Sparse training at equal density and budget on Fashion-MNIST (issue 19).

LeNet-300-100 and LeNet-5 at 10, 5, 2 and 1% density, three seeds: static random masks
(uniform and ERK), SNIP, SynFlow, SET (uniform, ERK), RigL (uniform, ERK), gradual magnitude
pruning (dense to sparse), the lottery ticket of the density (global IMP, ~20.6% a round),
RigL-ERK trained 2x longer, and the dense network; every run is one
of ``winnow experiment sparse-training`` (Adam, lr 1.2e-3, batch 60; updates every 100 steps,
alpha 0.3, no updates after 75% of training). The run store is kept under ``--results``, so an
interrupted bench resumes where it stopped.

    python bench/sparse_training.py [--models lenet300,lenet5] [--epochs 5] [--seeds 0,1,2]

Writes ``bench/results/sparse-training-<model>.md``/``.csv`` and the accuracy-vs-density plot.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from winnow import TrainConfig
from winnow.experiments import sparse_training as st

HERE = Path(__file__).resolve().parent
METHODS = ("static", "snip", "synflow", "set", "rigl", "gradual", "lottery")


def configs(model: str, epochs: float, seeds: tuple[int, ...], densities: tuple[float, ...]):
    common = dict(model=model, data="fashion-mnist", train=TrainConfig(epochs=epochs))
    runs = st.sweep(methods=METHODS, distributions=("uniform", "erk"), densities=densities,
                    seeds=seeds, **common)  # fmt: skip
    runs += [
        st.SparseTrainingConfig(
            method="rigl", distribution="erk", density=d, seed=s, budget=2.0, **common
        )  # fmt: skip
        for d in densities
        for s in seeds
    ]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet300,lenet5")
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--densities", default="0.1,0.05,0.02,0.01")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default="/tmp/winnow-bench/sparse-training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    densities = tuple(float(d) for d in args.densities.split(","))
    for model in args.models.split(","):
        results = Path(args.results) / model
        runs = configs(model, args.epochs, seeds, densities)
        started = time.perf_counter()
        store, summary = st.EXPERIMENT_SPEC.run(results, runs, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - started
        if summary.failed:
            print(f"{model}: {len(summary.failed)} runs failed", file=sys.stderr)
        out = HERE / "results" / f"sparse-training-{model}"
        paths = st.report(results, out=out)
        table = paths["table"].read_text()
        header = (
            f"# .venv/bin/python bench/sparse_training.py --models {model} --epochs {args.epochs:g}"
            f" --seeds {args.seeds} --threads {args.threads}\n"
            f"# torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}; "
            f"{len(runs)} runs, {seconds / 60:.1f} min this invocation (finished runs reused)\n\n"
        )
        paths["table"].write_text(header + table)
        if f"accuracy-{model}" in paths:
            shutil.move(paths[f"accuracy-{model}"], out.parent / f"{out.name}-accuracy.png")
        print(header + table)


if __name__ == "__main__":
    main()
