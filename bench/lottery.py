"""Lottery tickets on real data, and what the framework costs over a bare training loop.

Experiments (resumable: runs are stored as they finish under --results; the report is
rebuilt from the store and copied to bench/results/lottery-<name>*):

- ``lenet300``: LeNet-300-100 on Fashion-MNIST, Frankle & Carbin 2019's rates (20% of the
  remaining weights per round in the hidden layers, 10% in the output layer), 18 rounds
  (down to about 2% of the weights), reset to θ₀, Adam 1.2e-3, batch 60, 3,000 steps per
  round (3.6 epochs), evaluated every 250 steps; seeds 0-2; random-reinit and random-mask
  controls.
- ``mnist1d``: the MNIST-1D MLP (100-100) on MNIST-1D (Greydanus 2020), the same rates and
  rounds, Adam 1e-2, batch 100, 3,000 steps per round.
- ``rewind``: LeNet-5 on Fashion-MNIST, global pruning 20% per round, 10 rounds, reset to θ₀
  vs rewind to iteration 150 (5% of training), 3,000 steps per round; seeds 0-1.
- ``cost``: the IMP experiment through winnow (run store, checkpoints, masks on disk,
  enforcement) against a minimal hand-written loop doing the same steps (same optimizer,
  batches, evaluations and per-layer magnitude pruning; the mask multiplied into the weights
  after every step), alternated, median of --repeat; the ratio is what the framework adds.

    python bench/lottery.py lenet300|mnist1d|rewind|cost [--seeds 0,1,2] [--results DIR]
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import winnow
from winnow.experiments import lottery
from winnow.schedules import lottery_rates
from winnow.training import TrainConfig

EXPERIMENTS = {
    "lenet300": dict(
        model="lenet300",
        data="fashion-mnist",
        rounds=18,
        rate=0.2,
        train=TrainConfig(iterations=3000, eval_every=250, batch_size=60, lr=1.2e-3),
    ),
    "mnist1d": dict(
        model="mlp1d",
        data="mnist1d",
        rounds=18,
        rate=0.2,
        train=TrainConfig(iterations=3000, eval_every=250, batch_size=100, lr=1e-2),
    ),
    "rewind": dict(
        model="lenet5",
        data="fashion-mnist",
        rounds=10,
        rate=0.2,
        scope="global",
        train=TrainConfig(iterations=3000, eval_every=250, batch_size=60, lr=1.2e-3),
    ),
}
REWINDS = (0, 150)


def run_experiment(name: str, seeds: tuple[int, ...], results: Path) -> None:
    options = EXPERIMENTS[name]
    if name == "rewind":
        configs = [
            c
            for k in REWINDS
            for c in lottery.sweep(seeds=seeds, controls=("none",), rewind=k, **options)
        ]
    else:
        configs = lottery.sweep(seeds=seeds, **options)
    print(f"{name}: {len(configs)} runs, {options}")
    start = time.perf_counter()
    lottery.run(results, configs, progress=False)
    paths = lottery.report(results)
    print(paths["table"].read_text())
    if "overlap" in paths:
        print(paths["overlap"].read_text())
    out = Path(__file__).parent / "results"
    for key, path in paths.items():
        target = out / path.name.replace("lottery", f"lottery-{name}", 1)
        shutil.copyfile(path, target)
        print(f"{key}: {target}")
    print(f"{time.perf_counter() - start:.0f} s")


def bare_imp(
    model: nn.Module,
    data,
    rounds: int,
    rate: float,
    iterations: int,
    eval_every: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> list[float]:
    """A minimal hand-written IMP loop: the same steps as the framework, nothing else."""
    init = copy.deepcopy(model.state_dict())
    rates = lottery_rates(model, rate)
    masks = {n: torch.ones_like(p) for n, p in model.named_parameters() if n in rates}
    accuracies = []
    for _ in range(rounds + 1):
        model.load_state_dict(init)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in masks:
                    p.mul_(masks[n])
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
        batches = winnow.data.Batches(
            data.x_train, data.y_train, batch_size, shuffle=True, seed=seed
        )
        model.train()
        for step, xb, yb in batches.steps(iterations):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in masks:
                        p.mul_(masks[n])
            if (step + 1) % eval_every == 0:
                winnow.evaluate(model, data.x_val, data.y_val)
                accuracies.append(winnow.evaluate(model, data.x_test, data.y_test)[1])
                model.train()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in masks:
                    alive = int(masks[n].sum())
                    prune = int(rates[n] * alive + 0.5)
                    scores = p.abs().flatten().masked_fill(masks[n].flatten() == 0, float("inf"))
                    drop = torch.topk(scores, prune, largest=False).indices
                    masks[n].view(-1)[drop] = 0
    return accuracies


def measure_cost(repeat: int) -> None:
    options = dict(
        model="lenet300",
        data="fashion-mnist",
        rounds=3,
        rate=0.2,
        train=TrainConfig(iterations=1000, eval_every=250, batch_size=60, lr=1.2e-3),
    )
    data = winnow.data.load("fashion-mnist", seed=0)
    lottery.load_data("fashion-mnist", 0, None)  # the framework's cached copy, loaded once
    framework, bare = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            lottery.run(
                tmp, lottery.sweep(seeds=(0,), controls=("none",), **options), progress=False
            )
            framework.append(time.perf_counter() - start)
        model = winnow.models.create_for("lenet300", data, seed=0)
        start = time.perf_counter()
        bare_imp(model, data, 3, 0.2, 1000, 250, 60, 1.2e-3, 0)
        bare.append(time.perf_counter() - start)
    f, b = statistics.median(framework), statistics.median(bare)
    print("IMP, LeNet-300-100 / Fashion-MNIST, 4 rounds x 1000 steps, eval every 250:")
    print(f"  winnow experiment: {f:.2f} s (runs {', '.join(f'{t:.2f}' for t in framework)})")
    print(f"  bare loop:         {b:.2f} s (runs {', '.join(f'{t:.2f}' for t in bare)})")
    print(f"  ratio winnow / bare: {f / b:.3f} (target <= 1.10)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "cost"])
    parser.add_argument("--seeds", help="comma-separated (default 0,1,2; rewind 0,1)")
    parser.add_argument(
        "--results", type=Path, help="run store (default results/bench-lottery-NAME)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="cost: alternated repetitions")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.experiment == "cost":
        measure_cost(args.repeat)
        return
    default_seeds = "0,1" if args.experiment == "rewind" else "0,1,2"
    seeds = tuple(int(s) for s in (args.seeds or default_seeds).split(","))
    results = args.results or Path(f"results/bench-lottery-{args.experiment}")
    run_experiment(args.experiment, seeds, results)


if __name__ == "__main__":
    main()
