"""The cost of growth: a RigL training step against a static sparse step, over a whole run
(issue 19, item 3).

LeNet-300-100 on Fashion-MNIST, batch 60, Adam, 10% density with ERK densities; the same
number of steps with (a) a static random mask and (b) RigL (update every 100 steps, dense
gradients captured at update steps only, no updates after 75%). Also momentum growth (dense
gradients at every step) for contrast. Runs alternate (a, b, c, a, b, c, ...) and the medians
of the per-step times are compared, all in this one process; the evaluation runs once, at the
end, and is not timed.

    python bench/growth_overhead.py [--steps 2000] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import winnow
from winnow import data, models
from winnow.core.distributions import layer_densities
from winnow.schedules import DynamicSparsity, OneShot, Pruner


def one_run(kind: str, splits, steps: int) -> float:
    model = models.create_for("lenet300", splits, seed=0)
    densities = layer_densities(model, 0.1, "erk")
    config = winnow.TrainConfig(iterations=steps, batch_size=60, eval_every=steps)
    masks, pruner = None, None
    if kind == "static":
        masks = Pruner("random", OneShot(densities), scope="layer").prune(model)
    else:
        grow = "gradient" if kind == "rigl" else "momentum"
        pruner = DynamicSparsity(densities, steps, grow=grow, update_every=100)
    timing = {}

    class Clock(winnow.training.Callback):
        def after_step(self, iteration, model):
            if iteration == 1:
                timing["start"] = time.perf_counter()
            if iteration == steps:
                timing["end"] = time.perf_counter()

    winnow.train(model, splits, config, masks=masks, pruner=pruner, callbacks=[Clock()],
                 eval_splits={})  # fmt: skip
    return (timing["end"] - timing["start"]) / (steps - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = data.load("fashion-mnist", seed=0)
    kinds = ("static", "rigl", "momentum")
    times = {k: [] for k in kinds}
    one_run("static", splits, 200)  # warm-up
    for _ in range(args.repeats):
        for kind in kinds:
            times[kind].append(one_run(kind, splits, args.steps))
    print(f"# .venv/bin/python bench/growth_overhead.py --steps {args.steps} "
          f"--repeats {args.repeats} --threads {args.threads}")  # fmt: skip
    print(
        f"# torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}; "
        "LeNet-300-100, Fashion-MNIST, batch 60, Adam, 10% density (ERK); nothing else running"
    )
    static = statistics.median(times["static"])
    for kind in kinds:
        median = statistics.median(times[kind])
        spread = ", ".join(f"{1e6 * t:.0f}" for t in times[kind])
        print(f"{kind:<9} median {1e6 * median:7.1f} us/step ({spread}); "
              f"x static {median / static:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
