"""Cost of scoring at initialisation, as a ratio to plain passes of the same network.

For VGG-19 and ResNet-20 (CIFAR shape, 3x32x32, 10 classes), measured in one run:

- one forward+backward pass of a batch of 128 random examples (the unit for SNIP and GraSP);
- SNIP on that batch, GraSP on it (temperature 200), each including winnow's private copy;
- one forward+backward pass of a single all-ones sample (the unit for SynFlow);
- SynFlow with 100 rounds to 1% density, with the time spent in selection reported apart;
  its unit is timed after every round, inside the run, because this machine's speed swings by
  2-4x within seconds (SNIP and GraSP are set against passes timed just before and after).
  The first SynFlow call in a process (one-time loading and preparing) is timed apart.

Targets (issue 3): SNIP <= 1.5 passes, GraSP <= 4 passes, SynFlow-100 <= 100 single-sample
passes + 20% for selection (i.e. <= 120).

    python bench/at_init_cost.py [--models vgg19,resnet20] [--repeat 3] [--synflow-repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
from torch import nn

import winnow.schedules.pruner as schedules
from winnow import criteria, models, prunable_parameters
from winnow.core._topk import Survivors
from winnow.schedules import LayerCollapseWarning, prune_at_init


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, repeat: int, synflow_repeat: int) -> None:
    model = models.create(name, in_channels=3, input_size=32, num_classes=10, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (128,), generator=gen)
    weights = list(prunable_parameters(model).values())

    def batch_pass():
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        torch.autograd.grad(loss, weights)

    ones = torch.ones(1, 3, 32, 32)

    def single_pass():
        model.eval()
        torch.autograd.grad(model(ones).sum(), weights)

    # interleaved: each scoring is set against the passes timed just before and after it, so
    # a drift of the machine's speed during the run does not enter the ratios
    def ratios(fn, unit, runs: int, unit_repeat: int):
        out = []
        for _ in range(runs):
            before = median_time(unit, unit_repeat)
            start = time.perf_counter()
            result = fn()
            took = time.perf_counter() - start
            after = median_time(unit, unit_repeat)
            out.append((took / ((before + after) / 2), (before + after) / 2, result))
        return out

    snip = ratios(lambda: criteria.score(model, "snip", (x, y), samples=128), batch_pass, repeat, 1)
    grasp = ratios(
        lambda: criteria.score(model, "grasp", (x, y), samples=128), batch_pass, repeat, 1
    )

    # SynFlow: the speed of this machine swings by 2-4x within seconds, so a baseline pass is
    # timed after every round (inside the run, subtracted from its wall time): the rounds and
    # their unit see the same machine. Selection = Survivors.select + zeroing the weights just
    # removed, timed apart.
    selecting, units = [], []

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            selecting.append(time.perf_counter() - start)
            return out

        return wrapper

    zero = timed(schedules.zero_removed)

    def zero_then_unit(*args, **kwargs):
        zero(*args, **kwargs)  # the last call of a round
        start = time.perf_counter()
        single_pass()
        units.append(time.perf_counter() - start)

    def synflow_run():
        selecting.clear()
        units.clear()
        start = time.perf_counter()
        masks = prune_at_init(model, "synflow", 0.01, input_shape=(3, 32, 32), rounds=100)
        took = time.perf_counter() - start - sum(units)
        unit = sum(units) / len(units)
        return took / unit, unit, (masks, sum(selecting) / unit)

    # the first call in a process also loads numba's compiled loops (cached on disk), starts
    # their threads and has oneDNN prepare the channels-last convolutions: timed apart, and kept
    # out of the ratios
    warm_ups = []
    for _ in range(2):
        start = time.perf_counter()
        with warnings.catch_warnings():  # ResNet-20's 1x1 shortcut may empty: reported below
            warnings.simplefilter("ignore", LayerCollapseWarning)
            prune_at_init(model, "synflow", 0.5, input_shape=(3, 32, 32), rounds=2)
        warm_ups.append(time.perf_counter() - start)
    originals = Survivors.select, schedules.zero_removed
    Survivors.select, schedules.zero_removed = timed(Survivors.select), zero_then_unit
    try:
        single_pass()  # warm-up
        synflow = [synflow_run() for _ in range(synflow_repeat)]
    finally:
        Survivors.select, schedules.zero_removed = originals
    params = sum(w.numel() for w in weights)
    print(
        f"{name}: {params:,} prunable weights; batch pass {snip[0][1] * 1e3:.0f} ms, "
        f"single-sample pass {synflow[0][1] * 1e3:.1f} ms"
    )

    def summary(runs):
        values = sorted(r[0] for r in runs)
        return f"{statistics.median(values):6.2f} (runs: {', '.join(f'{v:.2f}' for v in values)})"

    print(f"  SNIP     {summary(snip)} batch passes   (target <= 1.5)")
    print(f"  GraSP    {summary(grasp)} batch passes   (target <= 4)")
    select_share = sorted(share for _, _, (_, share) in synflow)
    masks = synflow[0][2][0]
    print(
        f"  SynFlow  {summary(synflow)} single passes for 100 rounds (target <= 120), of which "
        f"selection {statistics.median(select_share):.1f}; final density {masks.density():.4f}, "
        f"collapsed layers: {masks.collapsed_layers()}"
    )
    print(
        f"  (first SynFlow call in this process: {warm_ups[0] - warm_ups[1]:.2f} s more than the "
        "next: numba loads the compiled selection loops, oneDNN prepares the channels-last "
        "convolutions; not in the ratios)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg19,resnet20")
    parser.add_argument("--repeat", type=int, default=3, help="SNIP and GraSP runs")
    parser.add_argument("--synflow-repeat", type=int, default=3, help="SynFlow-100 runs")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    for name in args.models.split(","):
        bench(name, args.repeat, args.synflow_repeat)


if __name__ == "__main__":
    main()
