"""Reliability at scale: mutation fuzzing of every kind of winnow file, and sweeps killed at
random moments and resumed.

    .venv/bin/python bench/reliability.py --fuzz 10000 --kills 30

- Fuzz (``tests/fuzz_cases.py``): ``--fuzz`` seeded mutations per kind (mask files, sparse
  checkpoints, tensor files, the run store's SQLite database with its run directories), each
  read back by winnow. Outcomes: a winnow error, the exact content, or other (a crash with
  another exception, or different content without an error: none is allowed). Also the
  largest growth of the process's peak memory during one case.
- Kill and resume: a lottery sweep and an at-init sweep, each run in a child process killed
  with SIGKILL at a random moment (``--kills`` times each), then resumed until it finishes; the
  records and mask files must equal those of an uninterrupted run.

Prints its figures; ``--out`` also writes them to a file.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

SWEEPS = {
    "lottery": """
from winnow import TrainConfig
from winnow.experiments import lottery
train = TrainConfig(iterations=60, eval_every=20, batch_size=32)
configs = lottery.sweep(seeds=(0, 1), controls=("none", "reinit"), model="mlp", data="synthetic",
                        rounds=4, rate=0.5, train=train, data_limit=300)
lottery.run(RESULTS, configs, progress=False)
""",
    "at-init": """
from winnow import TrainConfig
from winnow.experiments import at_init
configs = at_init.sweep(methods=("magnitude", "snip", "synflow"), densities=(0.2, 0.05),
                        seeds=(0,), controls=("none", "shuffle"), model="mlp", data="synthetic",
                        train=TrainConfig(epochs=1), data_limit=300)
at_init.run(RESULTS, configs, progress=False)
""",
}


def _run_sweep(name: str, results: Path, kill_after: float | None) -> bool:
    """Run the sweep in a child; with ``kill_after``, SIGKILL it after that many seconds.
    Returns whether the child finished on its own."""
    script = f"RESULTS = {str(results)!r}\n" + SWEEPS[name]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    child = subprocess.Popen([sys.executable, "-c", script], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        child.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        child.wait()
        return False
    if child.returncode != 0:
        raise RuntimeError(f"{name} sweep failed: {child.stderr.read().decode()[-2000:]}")
    return True


def _snapshot(results: Path, name: str) -> tuple:
    """What a finished sweep holds: its records (times left out) and its mask files' bits."""
    from winnow import Masks
    from winnow.experiments import RunStore

    store = RunStore(results)
    rows = store.records(name)
    records = sorted(
        (r["run_id"], r["kind"], r["step"],
         repr({k: v for k, v in r.items() if "seconds" not in k}))
        for r in rows
    )  # fmt: skip
    masks = sorted(
        (str(p.relative_to(results)), tuple((k, m.tolist()) for k, m in Masks.load(p).items()))
        for p in results.glob(f"{name}/*/masks*.safetensors")
    )
    statuses = sorted((r["run_id"], r["status"]) for r in store.runs(name))
    store.close()
    return records, masks, statuses


def kill_and_resume(name: str, kills: int, seed: int) -> dict:
    """Kill the sweep ``kills`` times at random moments and resume it each time; compare with
    an uninterrupted run."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean"
        started = time.perf_counter()
        _run_sweep(name, clean, None)
        duration = time.perf_counter() - started
        expected = _snapshot(clean, name)
        done_kills, finished_sweeps, mismatches = 0, 0, 0
        while done_kills < kills:
            results = Path(tmp) / f"killed-{finished_sweeps}"
            while True:  # kill it at random moments until it finishes on its own
                if done_kills < kills:
                    finished = _run_sweep(name, results, rng.uniform(0.5, duration))
                    done_kills += not finished
                else:
                    finished = _run_sweep(name, results, None)
                if finished:
                    break
            finished_sweeps += 1
            mismatches += _snapshot(results, name) != expected
    return {
        "kills": done_kills, "sweeps": finished_sweeps, "mismatches": mismatches,
        "seconds_per_sweep": duration,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz", type=int, default=10_000, help="mutations per file kind")
    parser.add_argument("--kills", type=int, default=30, help="SIGKILLs per sweep kind")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    import torch
    from fuzz_cases import KINDS, fuzz

    lines = [
        f"$ .venv/bin/python bench/reliability.py --fuzz {args.fuzz} --kills {args.kills}",
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{torch.get_num_threads()} threads",
        "",
        f"fuzz: {args.fuzz} mutations per kind, seed {args.seed}",
        f"{'kind':<10} {'library error':>14} {'identical':>10} {'other':>6} "
        f"{'max peak growth':>16} {'seconds':>8}",
    ]
    print("\n".join(lines))
    for kind in KINDS:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            found = fuzz(kind, args.fuzz, args.seed, Path(tmp))
        line = (
            f"{kind:<10} {found.counts['error']:>14} {found.counts['identical']:>10} "
            f"{found.counts['other']:>6} {found.peak_growth / 2**20:>12.1f} MiB "
            f"{time.perf_counter() - started:>8.1f}"
        )
        lines.append(line)
        print(line)
        for other in found.others[:10]:
            lines.append(f"    {other}")
            print(f"    {other}")
    lines += ["", "kill -9 and resume (each sweep killed at random moments until it finishes):"]
    print(lines[-1])
    for name in SWEEPS:
        outcome = kill_and_resume(name, args.kills, args.seed)
        line = (
            f"{name:<8} {outcome['kills']} kills over {outcome['sweeps']} sweeps "
            f"(an uninterrupted sweep: {outcome['seconds_per_sweep']:.1f} s); "
            f"sweeps whose records, masks or statuses differ from the uninterrupted one: "
            f"{outcome['mismatches']}"
        )
        lines.append(line)
        print(line)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
