"""Dense baselines that every pruning result in winnow is compared against.

- LeNet-300-100 on Fashion-MNIST: 5 epochs of Adam (lr 1.2e-3), batch 60, 5,000 validation
  examples held out (Frankle & Carbin 2019's set-up for MNIST).
- The 1-D CNN of the MNIST-1D paper (Greydanus 2020) on MNIST-1D: 6,000 steps of Adam
  (lr 1e-2), batch 100, trained on all 4,000 training examples as in the paper (which reports
  about 94% for its CNN).

    python bench/baselines.py [--seeds 3]

Prints the test accuracy per seed, its mean and standard deviation, and the time per epoch.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

import winnow
from winnow import TrainConfig, train

BASELINES = {
    "lenet300 / fashion-mnist": dict(
        model="lenet300",
        data="fashion-mnist",
        val_size=None,
        config=dict(epochs=5, batch_size=60, optimizer="adam", lr=1.2e-3),
    ),
    "cnn1d / mnist1d": dict(
        model="cnn1d",
        data="mnist1d",
        val_size=0,
        config=dict(iterations=6000, batch_size=100, optimizer="adam", lr=1e-2, eval_every=1000),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    for label, spec in BASELINES.items():
        data = winnow.data.load(spec["data"], val_size=spec["val_size"])
        accuracies, seconds = [], []
        for seed in range(args.seeds):
            model = winnow.models.create_for(spec["model"], data, seed=seed)
            result = train(model, data, TrainConfig(seed=seed, **spec["config"]))
            accuracies.append(result.final["test_acc"])
            epochs = result.iterations * spec["config"]["batch_size"] / len(data.y_train)
            seconds.append(result.seconds / epochs)
            print(f"  {label} seed {seed}: test accuracy {accuracies[-1]:.2%}")
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        print(
            f"{label}: {statistics.mean(accuracies):.2%} ± {spread:.2%} over {args.seeds} seeds "
            f"({statistics.median(seconds):.2f} s per epoch, evaluation included)"
        )


if __name__ == "__main__":
    main()
