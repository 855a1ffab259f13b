"""SparseGPT's cost per layer against the floor of its linear algebra (issue 17).

For each layer shape (rows x inputs) and target, times in the same run, interleaved:

- ``sparsegpt``: winnow's solver (mask selection, column updates, lazy block updates);
- ``floor``: the same linear algebra alone: the Cholesky factor of H + λI, the inverse's upper
  factor, and for every column the rank-1 update of the block's remaining columns plus, per
  block of 128, the lazy update of the columns after it (no mask selection, no bookkeeping).

Reports the medians and their ratio (target: sparsegpt <= 2x floor).

    python bench/oneshot_cost.py [--repeat 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import torch

from winnow.core.nm import Pattern
from winnow.layerwise.solvers import BLOCK_SIZE, DAMPING, sparsegpt

SHAPES = {
    # MiniLM-L6 (hidden 384, FFN 1536) and the Shakespeare GPT-2 (n_embd 256, FFN 1024)
    "minilm q/k/v/o 384x384": (384, 384),
    "minilm ffn-in 1536x384": (1536, 384),
    "minilm ffn-out 384x1536": (384, 1536),
    "gpt2 c_attn 768x256": (768, 256),
    "gpt2 c_fc 1024x256": (1024, 256),
    "gpt2 c_proj 256x1024": (256, 1024),
}


def floor(weight: torch.Tensor, gram: torch.Tensor, tokens: int) -> None:
    """SparseGPT's linear algebra without its mask selection."""
    w = weight.clone()
    rows, cols = w.shape
    hessian = gram * (2.0 / tokens)
    hessian += DAMPING * torch.diagonal(hessian).mean() * torch.eye(cols)
    factor = torch.linalg.cholesky(hessian)
    factor = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    for start in range(0, cols, BLOCK_SIZE):
        end = min(start + BLOCK_SIZE, cols)
        block = w[:, start:end]
        errors = torch.randn(end - start, rows) * 1e-3  # stands for the errors computed
        local = factor[start:end, start:end]
        for i in range(end - start):
            block[:, i:].addr_(errors[i], local[i, i:], alpha=-1.0)
        w[:, end:].addmm_(errors.T, factor[start:end, end:], alpha=-1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tokens", type=int, default=128 * 128, help="calibration tokens")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or 'cpu'}; "
        f"H from {args.tokens} tokens; medians of {args.repeat} interleaved runs"
    )
    print(f"{'layer':<26} {'target':>6} {'sparsegpt ms':>12} {'floor ms':>9} {'ratio':>6}")
    ratios = []
    for label, (rows, cols) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.tokens // 16, cols, generator=gen)  # 1/16: H costs no more here
        gram = x.T @ x * 16
        weight = torch.randn(rows, cols, generator=gen) / cols**0.5
        for target in ({"density": 0.5}, {"pattern": Pattern(2, 4)}):
            times = {"sparsegpt": [], "floor": []}
            runs = {
                "sparsegpt": functools.partial(sparsegpt, weight, gram, args.tokens, **target),
                "floor": functools.partial(floor, weight, gram, args.tokens),
            }
            for run in runs.values():
                run()  # warm-up
            for _ in range(args.repeat):
                for name, run in runs.items():
                    began = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - began)
            ours, base = statistics.median(times["sparsegpt"]), statistics.median(times["floor"])
            ratios.append(ours / base)
            shown = "50%" if "density" in target else "2:4"
            print(f"{label:<26} {shown:>6} {ours * 1e3:>12.2f} {base * 1e3:>9.2f} "
                  f"{ours / base:>6.2f}")  # fmt: skip
    print(f"largest ratio {max(ratios):.2f} (target <= 2), median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
