"""Pruning at initialisation on real data: accuracy vs density for every method, with controls.

Runs the at-init experiment (winnow.experiments.at_init) on Fashion-MNIST: a dense reference
per seed, then random, magnitude, SNIP, GraSP and SynFlow at 10, 5, 2, 1, 0.5 and 0.2% of the
weights, each with its layerwise-shuffled control (Frankle et al. 2021), trained for 5 epochs
(LeNet-300-100: Adam 1.2e-3, batch 60). Runs are stored as they finish under --results, so an
interrupted benchmark resumes; the table and plots are rebuilt from the store.

    python bench/at_init.py [--model lenet300] [--seeds 0,1,2] [--results results/bench-at-init]
"""

from __future__ import annotations

import argparse
import time

import torch

from winnow import TrainConfig
from winnow.experiments import at_init


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet300")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--lr", type=float, default=1.2e-3)
    parser.add_argument("--results", default="results/bench-at-init")
    args = parser.parse_args()
    configs = at_init.sweep(
        model=args.model,
        data=args.data,
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        train=TrainConfig(epochs=args.epochs, lr=args.lr),
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(configs)} runs")
    start = time.perf_counter()
    at_init.run(args.results, configs, progress=False)
    paths = at_init.report(args.results)
    print(paths["table"].read_text())
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
