"""Training-step cost of keeping pruned weights at zero.

Compares, at 90% sparsity, one training step (zero_grad, forward, backward, optimizer step) of

- ``dense``:  the unpruned model;
- ``winnow``: winnow's enforcement (the gradients masked in one fused multiply at the
  optimizer's pre-step hook, so any change of ``.grad`` after backward is masked too; nothing
  in the forward pass);
- ``accum``:  the gradients masked as they accumulate (a hook per tensor: winnow's design until
  issue 15, still what :func:`winnow.enforce` does without an optimizer);
- ``hooks``:  ``torch.nn.utils.prune`` (the weight is recomputed as weight_orig * mask by a
  forward pre-hook on every call).

The variants are interleaved step by step (dense, winnow, hooks in a shuffled order, then the
next step), so drifts of the machine's speed hit all of them alike; each step is timed, and the
ratio of the median step times (and of the 10%-trimmed means) to dense is reported.

    python bench/mask_overhead.py [--optimizer adam|adam-default|sgd] [--steps 3000] [--threads N]

Targets: winnow / dense <= 1.03 on LeNet-300-100 at batch 60 (issue 2), <= 1.05 with the
mask at the optimizer's step (issue 15).
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import time

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from winnow import Masks, enforce, models, prunable_parameters


def random_masks(model: nn.Module, density: float, seed: int) -> Masks:
    gen = torch.Generator().manual_seed(seed)
    return Masks(
        {
            n: torch.rand(p.shape, generator=gen) < density
            for n, p in prunable_parameters(model).items()
        }
    )


OPTIMIZERS = {
    # what winnow.train uses: the fused kernel
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, fused=True),
    # torch's default on the CPU (per-tensor loop); its sqrt is ~8x slower on exact zeros
    "adam-default": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True),
}


def build_variants(name: str, density: float, lr: float, optimizer_name: str) -> dict:
    make_optimizer = OPTIMIZERS[optimizer_name]
    base = models.create(name, seed=0)
    masks = random_masks(base, density, seed=1)
    variants = {}

    dense = copy.deepcopy(base)
    variants["dense"] = (dense, make_optimizer(dense.parameters(), lr))

    ours = copy.deepcopy(base)
    optimizer = make_optimizer(ours.parameters(), lr)
    enforce(ours, masks, optimizer)
    variants["winnow"] = (ours, optimizer)

    accumulated = copy.deepcopy(base)
    enforce(accumulated, masks)  # no optimizer: masked as the gradients accumulate
    variants["accum"] = (accumulated, make_optimizer(accumulated.parameters(), lr))

    hooked = copy.deepcopy(base)
    modules = dict(hooked.named_modules())
    for param_name, mask in masks.items():
        module_name = param_name.rsplit(".", 1)[0]
        torch_prune.custom_from_mask(modules[module_name], "weight", mask)
    variants["hooks"] = (hooked, make_optimizer(hooked.parameters(), lr))
    return variants


def bench_model(
    name: str, batch: int, density: float, lr: float, optimizer: str, steps: int
) -> dict[str, list[float]]:
    """Seconds per training step of every variant, interleaved step by step."""
    variants = build_variants(name, density, lr, optimizer)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(batch, 1, 28, 28, generator=gen),
            torch.randint(0, 10, (batch,), generator=gen),
        )
        for _ in range(16)
    ]

    def step(model, optimizer, x, y):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for model, optimizer in variants.values():  # warm-up
        for x, y in batches:
            step(model, optimizer, x, y)
    order = list(variants)
    shuffler = random.Random(0)
    times = {k: [] for k in variants}
    for i in range(steps):
        x, y = batches[i % len(batches)]
        shuffler.shuffle(order)
        for key in order:
            start = time.perf_counter()
            step(*variants[key], x, y)
            times[key].append(time.perf_counter() - start)
    return times


def trimmed_mean(values: list[float], cut: float = 0.1) -> float:
    """Mean of the values between the ``cut`` and ``1 - cut`` quantiles (drops outliers)."""
    ordered = sorted(values)
    drop = int(len(ordered) * cut)
    kept = ordered[drop : len(ordered) - drop] or ordered
    return sum(kept) / len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=3000, help="LeNet steps per variant (Conv-2: a hundredth)"
    )
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or 'cpu'}; "
        f"batch {args.batch}, sparsity {args.sparsity:.0%}, optimizer {args.optimizer}; "
        f"variants interleaved step by step in shuffled order, {args.steps} (LeNet) / "
        f"{args.steps // 100} (Conv-2) steps each"
    )
    print(
        f"{'model':<10} {'variant':<7} {'ms/step (median)':>16} {'ratio of medians':>17} "
        f"{'ratio of trimmed means':>23}"
    )
    results = {}
    for name, lr, steps in (("lenet300", 1.2e-3, args.steps), ("conv2", 2e-4, args.steps // 100)):
        times = bench_model(name, args.batch, 1 - args.sparsity, lr, args.optimizer, max(steps, 5))
        dense_median = statistics.median(times["dense"])
        dense_mean = trimmed_mean(times["dense"])
        for key, values in times.items():
            median = statistics.median(values)
            ratio = median / dense_median
            results[(name, key)] = ratio
            print(
                f"{name:<10} {key:<7} {median * 1e3:>16.3f} {ratio:>17.3f} "
                f"{trimmed_mean(values) / dense_mean:>23.3f}"
            )
    target = results[("lenet300", "winnow")]
    verdict = "meets" if target <= 1.05 else "misses"
    print(
        f"winnow / dense on LeNet-300-100 (ratio of medians): {target:.3f} ({verdict} the 1.05 "
        "target)"
    )


if __name__ == "__main__":
    main()
