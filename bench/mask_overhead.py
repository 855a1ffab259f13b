"""Training-step cost of keeping pruned weights at zero.

Compares, at 90% sparsity, one training step (zero_grad, forward, backward, optimizer step) of

- ``dense``:  the unpruned model;
- ``winnow``: winnow's enforcement (gradient mask after accumulation + re-zero after the step,
  nothing in the forward pass);
- ``hooks``:  ``torch.nn.utils.prune`` (the weight is recomputed as weight_orig * mask by a
  forward pre-hook on every call).

The variants are interleaved: each round times a block of steps of every variant in a shuffled
order, and a round's ratio divides by the dense time of the same round, so drifts of the
machine's speed cancel. The median ratio over rounds is reported with its quartiles.

    python bench/mask_overhead.py [--optimizer adam|adam-default|sgd] [--rounds 30] [--threads N]

Target (issue 2): winnow / dense <= 1.03 on LeNet-300-100 at batch 60.
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

    hooked = copy.deepcopy(base)
    modules = dict(hooked.named_modules())
    for param_name, mask in masks.items():
        module_name = param_name.rsplit(".", 1)[0]
        torch_prune.custom_from_mask(modules[module_name], "weight", mask)
    variants["hooks"] = (hooked, make_optimizer(hooked.parameters(), lr))
    return variants


def bench_model(
    name: str, batch: int, density: float, lr: float, optimizer: str, rounds: int, steps: int
):
    variants = build_variants(name, density, lr, optimizer)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(batch, 1, 28, 28, generator=gen),
            torch.randint(0, 10, (batch,), generator=gen),
        )
        for _ in range(steps)
    ]

    def run(model, optimizer):
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    for model, optimizer in variants.values():  # warm-up
        run(model, optimizer)
    order = list(variants)
    shuffler = random.Random(0)
    ratios = {k: [] for k in variants if k != "dense"}
    per_step = {k: [] for k in variants}
    for _ in range(rounds):
        shuffler.shuffle(order)
        elapsed = {}
        for key in order:
            start = time.perf_counter()
            run(*variants[key])
            elapsed[key] = time.perf_counter() - start
        for key in variants:
            per_step[key].append(elapsed[key] / steps)
        for key in ratios:
            ratios[key].append(elapsed[key] / elapsed["dense"])
    return per_step, ratios


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--steps", type=int, default=100, help="LeNet steps per timed block (Conv-2: a tenth)"
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
        f"{args.rounds} interleaved rounds of {args.steps} (LeNet) / "
        f"{args.steps // 10} (Conv-2) steps"
    )
    print(f"{'model':<10} {'variant':<7} {'ms/step':>8}  {'ratio to dense (q1 / median / q3)':>34}")
    results = {}
    for name, lr, steps in (("lenet300", 1.2e-3, args.steps), ("conv2", 2e-4, args.steps // 10)):
        per_step, ratios = bench_model(
            name, args.batch, 1 - args.sparsity, lr, args.optimizer, args.rounds, max(steps, 1)
        )
        for key in per_step:
            ms = statistics.median(per_step[key]) * 1e3
            if key == "dense":
                print(f"{name:<10} {key:<7} {ms:>8.3f}")
                continue
            q1, med, q3 = quartiles(ratios[key])
            results[(name, key)] = med
            print(f"{name:<10} {key:<7} {ms:>8.3f}  {q1:>10.3f} / {med:.3f} / {q3:.3f}")
    target = results[("lenet300", "winnow")]
    verdict = "meets" if target <= 1.03 else "misses"
    print(f"winnow / dense on LeNet-300-100: {target:.3f} ({verdict} the 1.03 target)")


if __name__ == "__main__":
    main()
