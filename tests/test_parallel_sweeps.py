"""Sweeps on several workers (winnow.experiments.parallel): a real local Ray (two CPUs) and real
processes, never mocks.

Parallel records equal serial ones bit for bit; two drivers started at once on one store
execute every run once; a worker killed with SIGKILL loses its lease when it expires and its
run is redone; results travel back through the driver when the worker writes elsewhere; a
failing run is listed and the command exits non-zero; the command line with ``--workers 2``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

import winnow.cli
from winnow import TrainConfig
from winnow.experiments import (
    EXPERIMENTS,
    Axis,
    Experiment,
    RunStore,
    at_init,
    check_store,
    config_id,
    run_sweep,
)
from winnow.experiments.parallel import Parallel, run_parallel

ray = pytest.importorskip("ray", reason="the Ray tests need pip install 'winnow[ray]'")

HERE = Path(__file__).parent
TOY = "toy-parallel"


# -- a toy experiment: each execution is logged, so a test counts them ---------------------------
@dataclass(frozen=True)
class Toy:
    value: int = 0
    log: str = ""  # every execution appends "run_id pid start-time" to this file
    sleep: float = 0.0
    fail_on: int = -1  # the value whose run raises
    needs: int | None = None  # the value of a toy run this one needs (RunStore.ensure)
    kill_marker: str = ""  # the first execution writes its pid here and waits to be killed


def toy_execute(run) -> None:
    config: Toy = run.config
    started = time.time()
    if config.log:
        with open(config.log, "a") as log:  # one short O_APPEND write per execution
            log.write(f"{run.run_id} {os.getpid()} {started!r}\n")
    base = 0
    if config.needs is not None:
        needed = replace(config, value=config.needs, needs=None, kill_marker="")
        parent = run.store.ensure(TOY, needed, toy_execute)
        run.link(parent)
        base = parent.load_json("value.json")["value"]
    if config.value == config.fail_on:
        raise ValueError(f"a broken run\n(value {config.value})")
    if config.kill_marker and not Path(config.kill_marker).exists():
        Path(config.kill_marker).write_text(str(os.getpid()))
        time.sleep(120)  # killed before this ends
    time.sleep(config.sleep)
    run.save_json("value.json", {"value": config.value + base})
    data = {"square": config.value**2, "base": base, "dir": str(run.dir), "pid": os.getpid()}
    run.record("result", 0, data, files=["value.json"])


def toy_sweep(values=(0, 1, 2), **fields) -> list[Toy]:
    return [Toy(value=v, **fields) for v in values]


def toy_report(results, out=None):
    rows = RunStore(results).records(TOY, kind="result")
    table = Path(results) / f"{TOY}.md"
    table.write_text("".join(f"{r['value']} {r['square']}\n" for r in rows))
    return {"table": table}


TOY_SPEC = Experiment(
    name=TOY,
    help="a toy experiment of the parallel sweep tests",
    config=Toy,
    axes=(Axis("value", "values", int, (0, 1, 2), "values"),),
    sweep=toy_sweep,
    execute=toy_execute,
    report=toy_report,
)


def executions(log: Path) -> list[tuple[str, int, float]]:
    if not log.exists():
        return []
    lines = log.read_text().split()
    return [(lines[i], int(lines[i + 1]), float(lines[i + 2])) for i in range(0, len(lines), 3)]


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray with two CPUs for the module; its workers (those of other drivers' jobs
    too) import this module through PYTHONPATH."""
    path = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = path
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(EXPERIMENTS, TOY, TOY_SPEC)


# -- the store's leases ---------------------------------------------------------------------------
def test_a_lease_is_exclusive_expires_and_is_taken_over(tmp_path):
    store = RunStore(tmp_path)
    first = store.claim(TOY, "r1", seconds=0.3)
    assert first.state == "claimed"
    other = store.claim(TOY, "r1", seconds=0.3)
    assert other.state == "held" and other.holder == first.lease.owner
    time.sleep(0.4)  # the first holder stopped renewing: its lease expired
    taken = store.claim(TOY, "r1", seconds=5)
    assert taken.state == "claimed"
    assert not first.lease.renew() and first.lease.lost
    with taken.lease:
        store.begin(TOY, Toy(value=1))
    taken = store.claim(TOY, config_id(Toy(value=1)))
    with taken.lease:
        store.begin(TOY, Toy(value=1)).finish()
    assert store.claim(TOY, config_id(Toy(value=1))).state == "done"
    assert store.lease(TOY, config_id(Toy(value=1))) is None  # released
    assert check_store(tmp_path) == []


SERIAL = """
import sys
from test_parallel_sweeps import TOY, Toy, toy_execute
from winnow.experiments import RunStore, run_sweep
config = Toy(value=1, kill_marker=sys.argv[2])
run_sweep(RunStore(sys.argv[1]), TOY, [config], toy_execute, progress=False)
"""


def test_a_serial_sweep_killed_with_sigkill_is_resumed_at_once(tmp_path):
    marker, root = tmp_path / "victim.pid", tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    child = subprocess.Popen([sys.executable, "-c", SERIAL, str(root), str(marker)], env=env)
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert int(marker.read_text()) == child.pid
    child.kill()
    child.wait(10)
    store = RunStore(root)
    config = Toy(value=1, kill_marker=str(marker))
    owner, expires = store.lease(TOY, config_id(config))
    assert owner.split("/")[2] == str(child.pid) and expires > time.time() + 30  # not expired
    summary = run_sweep(store, TOY, [config], toy_execute, progress=False)
    # done before the dead holder's lease would have expired: it was taken over, not waited out
    assert summary.ran == 1 and time.time() < expires
    # a driver's lease waits for its expiry even when the driver is gone: its workers may
    # outlive it a moment
    driver = f"{owner.rsplit('/', 1)[0]}/0000/driver"
    assert store.claim(TOY, "r2", owner=driver).state == "claimed"
    assert store.claim(TOY, "r2").state == "held"


def test_a_packed_run_is_ingested_with_its_checksums(tmp_path):
    source = RunStore(tmp_path / "worker")
    run = source.begin(TOY, Toy(value=3))
    toy_execute(run)
    run.finish()
    bundle = source.pack(TOY, run.run_id)
    store = RunStore(tmp_path / "store")
    stale = store.begin(TOY, Toy(value=3))
    stale.record("old", 7, {"x": 1})  # a record the new run does not have
    store.ingest(bundle)
    assert store.status(TOY, run.run_id) == "done"
    (row,) = store.records(TOY)
    assert (row["kind"], row["square"]) == ("result", 9)
    assert store.open(TOY, Toy(value=3)).intact("result", [0])
    assert check_store(tmp_path / "store") == []
    bad = {**bundle, "files": {**bundle["files"], "../escape": b"x"}}
    with pytest.raises(ValueError, match="outside"):
        store.ingest(bad)


# -- 4. reproducibility: parallel records are the serial ones -------------------------------------
def _records(root: Path) -> dict:
    rows = RunStore(root).records("at-init", status=None)
    return {
        (r["run_id"], r["kind"], r["step"]): {k: v for k, v in r.items() if "seconds" not in k}
        for r in rows
    }


def test_parallel_records_are_the_serial_records_bit_for_bit(tmp_path):
    configs = at_init.sweep(
        methods=("magnitude", "snip"), densities=(0.2,), seeds=(0,),
        controls=("none", "shuffle"), model="mlp", data="digits",
        train=TrainConfig(epochs=1), data_limit=300,
    )  # fmt: skip
    spec = at_init.EXPERIMENT_SPEC
    _, serial = spec.run(tmp_path / "serial", configs, False, Parallel(threads_per_run=1))
    on_ray = Parallel(workers=2, engine="ray", threads_per_run=1)
    started_here = not ray.is_initialized()  # run first in this file: winnow starts its Ray
    _, parallel = spec.run(tmp_path / "ray", configs, False, on_ray)
    if started_here:  # ray.init(num_cpus=2 workers x 1 thread), shut down after the sweep
        assert not ray.is_initialized()
    assert (serial.ran, parallel.ran) == (len(configs), len(configs))
    assert serial.failed == parallel.failed == []
    one, two = _records(tmp_path / "serial"), _records(tmp_path / "ray")
    assert len(one) == 2 * len(configs) - 1  # a prune and a result record each, dense no prune
    assert one == two  # every metric, exactly
    for path in (tmp_path / "serial" / "at-init").glob("*/*.safetensors"):
        twin = tmp_path / "ray" / "at-init" / path.parent.name / path.name
        assert twin.read_bytes() == path.read_bytes()


OWN_RAY = """
import json, sys
from test_parallel_sweeps import TOY, toy_execute, toy_sweep
from winnow.experiments import RunStore
from winnow.experiments.parallel import Parallel, run_parallel
root, log = sys.argv[1], sys.argv[2]
summary = run_parallel(RunStore(root), TOY, toy_sweep(range(4), log=log), toy_execute,
                       Parallel(workers=2, engine="ray"), progress=False)
print(json.dumps({"ran": summary.ran, "failed": summary.failed}))
"""


def test_the_ray_winnow_starts_finds_the_drivers_modules(tmp_path):
    """The run function lives in this test module, importable only from the driver's working
    directory (no PYTHONPATH): the workers of the Ray instance winnow starts get the driver's
    module search path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    store, log = tmp_path / "store", tmp_path / "executions.log"
    out = subprocess.run(
        [sys.executable, "-c", OWN_RAY, str(store), str(log)],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ran": 4, "failed": []}
    assert len(log.read_text().splitlines()) == 4


# -- 2. two drivers at once on one store ----------------------------------------------------------
DRIVER = """
import json, sys
from test_parallel_sweeps import TOY, Toy, toy_execute, toy_sweep
from winnow.experiments import RunStore
from winnow.experiments.parallel import Parallel, run_parallel
root, log, address = sys.argv[1], sys.argv[2], sys.argv[3] or None
configs = toy_sweep(range(8), log=log, sleep=0.4) + [
    Toy(value=v, log=log, sleep=0.4, needs=3) for v in (10, 11)
]
parallel = Parallel(workers=2, ray_address=address, lease_seconds=10)
summary = run_parallel(RunStore(root), TOY, configs, toy_execute, parallel, progress=False)
print(json.dumps({"ran": summary.ran, "skipped": summary.skipped, "failed": summary.failed}))
"""


def test_two_drivers_started_at_once_execute_every_run_once(tmp_path, ray_address):
    log = tmp_path / "executions.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ["PYTHONPATH"]])}
    drivers = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(tmp_path / "store"), str(log), address],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for address in (ray_address, "")  # one on the Ray cluster, one on local processes
    ]
    outputs = [driver.communicate(timeout=85) for driver in drivers]
    for driver, (_, err) in zip(drivers, outputs, strict=True):
        assert driver.returncode == 0, err
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    runs = {config_id(c) for c in toy_sweep(range(8), log=str(log), sleep=0.4)}
    runs |= {config_id(Toy(value=v, log=str(log), sleep=0.4, needs=3)) for v in (10, 11)}
    assert len(runs) == 10
    counts = {}
    for run_id, _, _ in executions(log):
        counts[run_id] = counts.get(run_id, 0) + 1
    assert counts == dict.fromkeys(runs, 1), counts  # every run once, by one driver or other
    for summary in summaries:
        assert summary["failed"] == [] and summary["ran"] + summary["skipped"] == 10
    assert 0 < summaries[0]["ran"] + summaries[1]["ran"] <= 10
    store = RunStore(tmp_path / "store")
    assert {r["run_id"] for r in store.runs(TOY, status="done")} == runs
    assert check_store(tmp_path / "store") == []


# -- 2. a worker killed with SIGKILL --------------------------------------------------------------
@pytest.mark.parametrize("engine", ["processes", "ray"])
def test_a_killed_worker_loses_its_lease_and_its_run_is_redone(tmp_path, engine, request):
    if engine == "ray":
        request.getfixturevalue("ray_address")
    log, marker = tmp_path / "executions.log", tmp_path / "victim.pid"
    configs = [Toy(value=1, log=str(log), kill_marker=str(marker)), Toy(value=2, log=str(log))]
    killed: list[float] = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        killed.append(time.time())

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    lease = 3.0
    parallel = Parallel(workers=2, engine=engine, lease_seconds=lease)
    summary = run_parallel(
        RunStore(tmp_path, lease_seconds=lease), TOY, configs, toy_execute, parallel, False
    )
    thread.join(5)
    assert summary.ran == 2 and summary.failed == []
    victim = config_id(configs[0])
    attempts = [(pid, at) for run_id, pid, at in executions(log) if run_id == victim]
    assert len(attempts) == 2 and attempts[0][0] == int(marker.read_text())
    # redone only once the lease (renewed every lease/3 s until the kill) had expired
    assert attempts[1][1] - killed[0] >= lease / 3, (attempts, killed)
    store = RunStore(tmp_path)
    assert store.status(TOY, victim) == "done" and store.lease(TOY, victim) is None
    assert check_store(tmp_path) == []


# -- 2. results travel back through the driver ----------------------------------------------------
def test_results_travel_back_when_the_worker_writes_elsewhere(tmp_path, ray_address):
    log, root = tmp_path / "executions.log", tmp_path / "store"
    configs = [Toy(value=1, log=str(log)), Toy(value=2, log=str(log), sleep=1.0)]
    configs.append(Toy(value=3, log=str(log), needs=1))
    parallel = Parallel(workers=2, engine="ray", transport="driver")
    summary = run_parallel(RunStore(root), TOY, configs, toy_execute, parallel, False)
    assert summary.ran == 3 and summary.failed == []
    store = RunStore(root)
    rows = {r["value"]: r for r in store.records(TOY, kind="result")}
    assert sorted(rows) == [1, 2, 3] and rows[3]["base"] == 1
    for config in configs:  # each worker wrote into a private directory, not the store
        row = rows[config.value]
        assert not Path(row["dir"]).is_relative_to(root) and not Path(row["dir"]).exists()
        assert row["pid"] != os.getpid()
        run = store.open(TOY, config)
        assert run.intact("result", [0]) and run.load_json("value.json")["value"] >= 1
    linked = {r["run_id"]: r["parent"] for r in store.runs(TOY)}
    assert linked[config_id(configs[2])] == f"{TOY}/{config_id(configs[0])}"
    assert check_store(root) == []
    # a finished run another run needs is read from the driver's store, not executed again
    before = [e for e in executions(log) if e[0] == config_id(configs[0])]
    more = run_parallel(
        RunStore(root), TOY, [Toy(value=4, log=str(log), needs=1)], toy_execute, parallel, False
    )
    assert more.ran == 1
    assert [e for e in executions(log) if e[0] == config_id(configs[0])] == before
    assert RunStore(root).records(TOY, kind="result")[-1]["base"] == 1


# -- 3. a failing run: listed, and the command exits non-zero -------------------------------------
def test_a_failing_run_is_listed_and_the_command_exits_non_zero(
    tmp_path, ray_address, toy_registered, capsys
):
    args = ["experiment", TOY, "--values", "1,2,3", "--fail-on", "2", "--workers", "2"]
    args += ["--ray-address", ray_address, "--results", str(tmp_path), "--no-progress"]
    assert winnow.cli.main(args) == 2
    captured = capsys.readouterr()
    failed = config_id(Toy(value=2, fail_on=2))
    assert f"failed: {TOY}/{failed}: ValueError: a broken run (value 2)" in captured.out
    assert "1 of 3 runs failed" in captured.err
    store = RunStore(tmp_path)
    assert store.status(TOY, failed) == "failed"
    assert "a broken run" in (store.run_dir(TOY, failed) / "traceback.txt").read_text()
    assert len(store.runs(TOY, status="done")) == 2


# -- 1. the command line with --workers 2 (local processes, the default engine) -------------------
def test_the_command_line_runs_a_sweep_on_two_workers(tmp_path, capsys):
    args = ["experiment", "at-init", "--model", "mlp", "--data", "digits", "--methods"]
    args += ["magnitude", "--densities", "20%", "--seeds", "0", "--controls", "none,shuffle"]
    args += ["--epochs", "1", "--data-limit", "300", "--results", str(tmp_path), "--workers"]
    args += ["2", "--threads-per-run", "1"]
    assert winnow.cli.main(args) == 0
    out = capsys.readouterr().out
    assert "3 runs into" in out and "on 2 workers (processes)" in out
    assert len(RunStore(tmp_path).runs("at-init", status="done")) == 3
    assert check_store(tmp_path) == []
    assert winnow.cli.main(args) == 0  # all done: nothing is redone
