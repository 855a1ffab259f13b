"""What `import winnow` costs beyond `import torch`, in fresh processes.

Each sample starts a new interpreter that imports torch, then winnow, then the names most
programs use first (Masks, Pruner, prune_at_init, select, train), and reports each duration
(perf_counter around each import); the figures are medians over ``--repeat`` processes. Also
counts the winnow modules loaded and whether numba, matplotlib or onnx came with them (they
should come only when a compiled selection, a plot or an export first needs them).

    .venv/bin/python bench/import_time.py --repeat 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = r"""
import json, sys, time
t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
import winnow; t2 = time.perf_counter()
first = sorted(m for m in sys.modules if m == "winnow" or m.startswith("winnow."))
from winnow import Masks, Pruner, prune_at_init, select, train; t3 = time.perf_counter()
loaded = sorted(m for m in sys.modules if m == "winnow" or m.startswith("winnow."))
heavy = [m for m in ("numba", "matplotlib", "onnx", "scipy", "sklearn") if m in sys.modules]
print(json.dumps({"torch": t1 - t0, "winnow": t2 - t1, "use": t3 - t2, "first": first,
                  "modules": loaded, "heavy": heavy}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="fresh processes (default 15)")
    args = parser.parse_args()
    samples = []
    for _ in range(args.repeat):
        out = subprocess.run(
            [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
        )
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    torch_s = [s["torch"] for s in samples]
    winnow_s = [s["winnow"] for s in samples]
    use_s = [s["use"] for s in samples]
    last = samples[-1]
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {args.repeat} processes")
    print(
        f"import torch:               median {statistics.median(torch_s):.3f} s "
        f"({min(torch_s):.3f}-{max(torch_s):.3f})"
    )
    print(
        f"import winnow after torch:  median {statistics.median(winnow_s):.3f} s "
        f"({min(winnow_s):.3f}-{max(winnow_s):.3f})"
    )
    print(
        f"then Masks, Pruner, prune_at_init, select, train: median "
        f"{statistics.median(use_s):.3f} s ({min(use_s):.3f}-{max(use_s):.3f})"
    )
    print(
        f"winnow modules loaded by `import winnow`: {len(last['first'])}; after those names: "
        f"{len(last['modules'])}; heavy packages loaded: {', '.join(last['heavy']) or 'none'}"
    )


if __name__ == "__main__":
    main()
