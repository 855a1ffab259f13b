"""Scaling out on this machine (issue 16): sweeps on several workers, Ray's overhead per run,
and a data-parallel training step.

    python bench/scale.py [--runs 12] [--epochs 1] [--repeat 1]

1. An at-init sweep of ``--runs`` short LeNet-300-100 runs (Fashion-MNIST, ``--epochs`` each,
   magnitude/SNIP/random at 10/5% and seeds) into a fresh store, four ways in this one run,
   each in a fresh process: 1 worker × 1 thread (serial; the reference), 1 worker × 2
   threads, 2 workers × 1 thread on local processes, and 2 workers × 1 thread on Ray (started
   first and timed apart: the speedup is given with Ray running, as a sweep sent to a cluster
   finds it, and with its start added, as when a sweep starts its own); ``--repeat`` times,
   the ways in turn (ABBA order), so that a slow spell of the machine hits every way. Wall
   times, the speedup of 2 × 1 over 1 × 1 in each repeat, their median and the ratio of the
   median walls, each way's mean training time per run (how much a run slows down when
   another runs beside it), the CPU time the host stole during each sweep (Linux), and the
   records of every repeat of every way checked equal to the serial one.
2. Ray's overhead per run: with Ray already started, 12 runs of 1 training step each on 2
   workers (Ray's workers and this process warmed by the same runs first); overhead =
   (wall · workers − the same runs' serial wall) / runs: scheduling, the task's start, and
   the result's way back, per run.
3. DDP: 200 steps of LeNet-300-100 with 2 gloo processes × batch B/2 (1 thread each) against
   1 process × batch B (1 thread), time per step after a warm-up (``winnow.train`` both).

Writes ``bench/results/scale.txt``. Run it with nothing else running.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

from winnow import TrainConfig  # noqa: E402
from winnow.experiments import at_init  # noqa: E402
from winnow.experiments.parallel import Parallel  # noqa: E402
from winnow.experiments.store import RunStore  # noqa: E402


def sweep_configs(runs: int, epochs: float, iterations: int | None = None):
    train = TrainConfig(iterations=iterations) if iterations else TrainConfig(epochs=epochs)
    configs = at_init.sweep(
        methods=("magnitude", "snip", "random"), densities=(0.1, 0.05), seeds=(0, 1),
        controls=("none",), model="lenet300", data="fashion-mnist", train=train,
        keep_weights=False,
    )  # fmt: skip
    configs = [c for c in configs if c.method != "dense"]
    return configs[:runs]


def records(root: Path) -> dict:
    rows = RunStore(root).records("at-init")
    return {(r["run_id"], r["kind"], r["step"]): {k: v for k, v in r.items() if "seconds" not in k}
            for r in rows}  # fmt: skip


def training_seconds(root: Path) -> list[float]:
    """Each run's training time (``winnow.train``'s own clock): how much slower a run is when
    another runs beside it."""
    return [r["seconds"] for r in RunStore(root).records("at-init", kind="result")]


def ways() -> dict[str, tuple[Parallel | None, int | None]]:
    """The ways a sweep runs: (parallel engine or None for serial, torch threads if serial)."""
    return {  # the first is the reference the others' records are compared with
        "1 worker x 1 thread": (None, 1),
        "1 worker x 2 threads": (None, 2),
        "2 workers x 1 thread (processes)": (Parallel(workers=2, threads_per_run=1), None),
        "2 workers x 1 thread (Ray)": (Parallel(workers=2, engine="ray", threads_per_run=1), None),
    }  # fmt: skip


def timed_sweep(
    configs, parallel: Parallel | None, threads: int | None = None
) -> tuple[float, Path]:
    root = Path(tempfile.mkdtemp(prefix="winnow-scale-"))
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        _, summary = at_init.EXPERIMENT_SPEC.run(root, configs, False, parallel)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    if summary.failed:
        raise RuntimeError(f"runs failed: {summary.failed}")
    return seconds, root


def start_ray(workers: int) -> float:
    """Start a local Ray as winnow's ray engine starts one for a sweep (``workers`` CPUs, no
    dashboard); the seconds it took."""
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)  # fmt: skip
    return time.perf_counter() - started


def _one_way(conn, name: str, runs: int, epochs: float) -> None:
    parallel, threads = ways()[name]
    start = 0.0
    if parallel is not None and parallel.engine == "ray":  # the sweep finds it running
        start = start_ray(parallel.workers * parallel.threads_per_run)
    seconds, root = timed_sweep(sweep_configs(runs, epochs), parallel, threads)
    conn.send((seconds, str(root), start))


def stolen_seconds() -> float | None:
    """CPU time the hypervisor gave to others while this machine's CPUs wanted it (the
    ``steal`` column of ``/proc/stat``, all CPUs, since boot); None where there is no such file.
    A way that ran while much was stolen ran on a slower machine than the others."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def sweep_in_fresh_process(name: str, runs: int, epochs: float) -> tuple[float, Path, float]:
    """:func:`timed_sweep` of the way ``name`` in a new process, as a user's command runs it:
    what the first run of a process pays (loading the data, torch's lazy imports) is paid by
    the serial way as by each worker, and no way finds a cache another way filled. The Ray
    way starts Ray first, timed apart (the third value; 0 for the others): the sweep then
    finds it running, as a sweep sent to a cluster does, and the sum is what a sweep that
    starts its own Ray takes."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_one_way, args=(theirs, name, runs, epochs))
    process.start()
    seconds, root, start = ours.recv()
    process.join()
    return seconds, Path(root), start


def _ddp_worker(steps: int, batch: int, out: str) -> None:
    import winnow
    from winnow import data, models

    torch.set_num_threads(1)
    splits = data.load("fashion-mnist", seed=0)
    model = models.create_for("lenet300", splits, seed=0)
    times = {}

    class Clock(winnow.training.Callback):
        def after_step(self, iteration, model):
            if iteration == 20:
                times["start"] = time.perf_counter()
            if iteration == steps:
                times["end"] = time.perf_counter()

    config = TrainConfig(iterations=steps, batch_size=batch, eval_every=steps)
    winnow.train(model, splits, config, callbacks=[Clock()], eval_splits={})
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(str((times["end"] - times["start"]) / (steps - 20)))


def ddp_part(log, steps: int = 200, batch: int = 120) -> None:
    from winnow.distributed import launch

    out = Path(tempfile.mkdtemp()) / "t"
    _ddp_worker(steps, batch, str(out))
    single = float(out.read_text())
    launch(_ddp_worker, 2, (steps, batch, str(out)))
    double = float(out.read_text())
    log(f"DDP LeNet-300-100, global batch {batch}: 1 process x batch {batch}: "
        f"{1e3 * single:.2f} ms/step; 2 gloo processes x batch {batch // 2}: "
        f"{1e3 * double:.2f} ms/step ({single / double:.2f}x)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=1, help="times each way runs, alternating")
    args = parser.parse_args()
    lines = [
        f"# .venv/bin/python bench/scale.py --runs {args.runs} --epochs {args.epochs:g} "
        f"--repeat {args.repeat}",
        f"# torch {torch.__version__}, {os.cpu_count()} cores, {platform.machine()}; "
        "nothing else running",
    ]

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    for line in lines:
        print(line)
    configs = sweep_configs(args.runs, args.epochs)
    log(f"at-init sweep: {len(configs)} LeNet-300-100 runs on Fashion-MNIST, {args.epochs:g} "
        "epoch(s) each; each way in a fresh process")  # fmt: skip
    names = list(ways())
    walls: dict[str, list[float]] = {name: [] for name in names}
    starts: dict[str, list[float]] = {name: [] for name in names}
    trained: dict[str, list[float]] = {name: [] for name in names}
    found: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeat):  # the ways alternate (ABBA), so a slow spell hits them all
        for name in names if repeat % 2 == 0 else reversed(names):
            before = stolen_seconds()
            seconds, root, start = sweep_in_fresh_process(name, args.runs, args.epochs)
            after = stolen_seconds()
            stolen = "" if before is None else f"  ({after - before:.1f} CPU s stolen by the host)"
            walls[name].append(seconds)
            starts[name].append(start)
            found[name].append(records(root))
            trained[name] += training_seconds(root)
            started = f" + {start:.1f} s Ray's start" if start else ""
            log(f"  [{repeat + 1}] {name:<34} {seconds:7.1f} s{started}{stolen}")
            shutil.rmtree(root, ignore_errors=True)
    reference = found["1 worker x 1 thread"][0]
    for name in names:
        same = "equal to" if all(f == reference for f in found[name]) else "differ from"
        log(f"  {name:<48} median {statistics.median(walls[name]):6.1f} s; records {same} "
            f"1 x 1's; training {statistics.mean(trained[name]):.2f} s a run (mean)")  # fmt: skip
    serial = walls["1 worker x 1 thread"]
    ray_way = "2 workers x 1 thread (Ray)"
    with_start = [w + s for w, s in zip(walls[ray_way], starts[ray_way], strict=True)]
    for engine, parallel_walls in (
        ("processes", walls["2 workers x 1 thread (processes)"]),
        ("Ray, already running (as with --ray-address)", walls[ray_way]),
        ("Ray, its start included (as when the sweep starts it)", with_start),
    ):
        paired = [a / b for a, b in zip(serial, parallel_walls, strict=True)]
        each = ", ".join(f"{r:.2f}x" for r in paired)
        medians = statistics.median(serial) / statistics.median(parallel_walls)
        log(f"  speedup of 2 workers x 1 thread over 1 x 1 on {engine}: {each} (each repeat: "
            f"the two ways in the same round); median of those {statistics.median(paired):.2f}x; "
            f"{medians:.2f}x on the median walls")  # fmt: skip

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tiny = sweep_configs(12, args.epochs, iterations=1)
        shutil.rmtree(timed_sweep(tiny, None, 1)[1], ignore_errors=True)  # data loaded, imports
        serial, root = timed_sweep(tiny, None, 1)
        shutil.rmtree(root, ignore_errors=True)
        timed_sweep(tiny, Parallel(workers=2, engine="ray", threads_per_run=1))  # warm workers
        on_ray, root = timed_sweep(tiny, Parallel(workers=2, engine="ray", threads_per_run=1))
        shutil.rmtree(root, ignore_errors=True)
        overhead = (on_ray * 2 - serial) / len(tiny)
        log(f"Ray overhead per run (12 runs of 1 step, Ray started, 2 workers): serial "
            f"{serial:.2f} s, Ray {on_ray:.2f} s -> {overhead:.3f} s per run")  # fmt: skip
    finally:
        ray.shutdown()
    ddp_part(log)
    (HERE / "results" / "scale.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
