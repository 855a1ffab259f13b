"""Sweeps on several workers: local processes, or tasks of a Ray cluster.

:func:`run_parallel` is :func:`~winnow.experiments.runner.run_sweep` with ``workers`` runs at
once. The process that calls it, the *driver*, keeps the run store and the progress display;
each run is one task that executes ``execute(run)`` in a worker:

- **Engines.** ``processes`` (the default): ``workers`` local processes started with
  ``spawn`` (a few seconds to import torch), a worker that dies is replaced. ``ray``: each run
  is a Ray task declaring ``num_cpus=threads_per_run`` and ``num_gpus=gpus_per_run``, on a Ray
  instance the driver starts for the sweep (``ray.init(num_cpus=workers x threads_per_run)``,
  no dashboard) or on an existing cluster (``ray_address``: ``auto`` or ``HOST:PORT``; a Ray
  already initialised in the driver's process is used as it is). Ray comes with
  ``pip install winnow[ray]``. Either way each task sets ``torch.set_num_threads``, and a GPU
  run sees its own GPUs (Ray's assignment; with processes, ``CUDA_VISIBLE_DEVICES`` per worker).
- **Leases.** The driver claims each run in the store before it hands it to a worker
  (:meth:`RunStore.claim <winnow.experiments.store.RunStore.claim>`: one transaction that
  fails if the run is done or another live process holds it) and renews the lease while the
  task runs. Two drivers over one store therefore never execute a run twice, a finished run is
  never redone, and a run some other driver holds is waited for. A worker that dies (killed,
  out of memory) costs its run's lease: the driver stops renewing it and claims the run again
  once it has expired, up to ``max_attempts`` times. A driver that dies loses all its leases
  the same way, to the next driver. Runs a task needs (a control's ticket, a shared artefact:
  :meth:`RunStore.ensure <winnow.experiments.store.RunStore.ensure>`) are claimed by the
  worker itself.
- **Where results go** (``transport``). A worker on the driver's machine that sees the store
  (the same host, the same directory) writes into it directly, as a serial sweep does
  (``direct``). Any other worker (``driver``, or ``auto`` on another machine) executes the run
  in a private temporary store and returns it as bytes (:meth:`RunStore.pack
  <winnow.experiments.store.RunStore.pack>`), which the driver writes into the store
  (:meth:`RunStore.ingest <winnow.experiments.store.RunStore.ingest>`): files atomically,
  every row with its checksum, the status last. The run's current state goes with the task, so
  an interrupted run resumes there; finished runs it needs are read from the driver's store
  (on Ray by an actor pinned to the driver's node). SQLite over a network file system is not
  safe, so a worker on another machine never opens the store, whatever it can mount.
- **Reproducibility.** A run's result depends on its configuration only: not on the worker,
  the engine or the number of workers. With the same ``threads_per_run`` (torch's reductions
  depend on the thread count), the records of a parallel sweep are bit for bit those of a
  serial one on CPU.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for
from typing import Any

from tqdm.auto import tqdm

from winnow.experiments.configs import config_id
from winnow.experiments.runner import (
    SweepProgress,
    SweepSummary,
    _one_line,
    execute_run,
    unique_configs,
)
from winnow.experiments.store import LEASE_SECONDS, Lease, Run, RunStore, new_owner

ENGINES = ("processes", "ray")
TRANSPORTS = ("auto", "direct", "driver")

__all__ = ["ENGINES", "TRANSPORTS", "Parallel", "run_parallel"]


@dataclass(frozen=True)
class Parallel:
    """How a sweep runs: ``workers`` runs at once (1 with no engine and no address: in the
    driver's process, as :func:`~winnow.experiments.runner.run_sweep` does).

    ``engine``: "processes" or "ray" (None: "ray" when ``ray_address`` is given, else
    "processes"). ``ray_address``: an existing Ray cluster ("auto" or "HOST:PORT").
    ``threads_per_run``: torch threads in each run, and a Ray task's ``num_cpus`` (None: 1 on
    workers, unchanged in a serial sweep). ``gpus_per_run``: GPUs each run gets (a Ray
    task's ``num_gpus``; with processes, a whole number of the visible GPUs per worker).
    ``transport``: "auto", "direct" or "driver" (see :mod:`winnow.experiments.parallel`).
    ``lease_seconds``: how long a run's lease lasts unless renewed (how soon the run of a
    worker that died is redone). ``max_attempts``: how often a run whose worker died is
    started before it is marked failed.
    """

    workers: int = 1
    engine: str | None = None
    ray_address: str | None = None
    threads_per_run: int | None = None
    gpus_per_run: float = 0.0
    transport: str = "auto"
    lease_seconds: float = LEASE_SECONDS
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a whole number >= 1, not {self.workers!r}")
        if self.engine is not None and self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; one of {', '.join(ENGINES)}")
        if self.engine == "processes" and self.ray_address is not None:
            raise ValueError("a Ray address needs the ray engine, not processes")
        if self.threads_per_run is not None and self.threads_per_run < 1:
            raise ValueError(f"threads_per_run must be >= 1, not {self.threads_per_run!r}")
        if not self.gpus_per_run >= 0:
            raise ValueError(f"gpus_per_run must be >= 0, not {self.gpus_per_run!r}")
        if self.kind == "processes" and self.gpus_per_run != int(self.gpus_per_run):
            raise ValueError("with the processes engine, gpus_per_run is a whole number")
        if self.transport not in TRANSPORTS:
            raise ValueError(
                f"unknown transport {self.transport!r}; one of {', '.join(TRANSPORTS)}"
            )
        if not self.lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, not {self.lease_seconds!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {self.max_attempts!r}")

    @property
    def kind(self) -> str:
        """The engine the sweep uses: "serial", "processes" or "ray"."""
        if self.engine is not None:
            return self.engine if self.engine == "ray" or self.workers > 1 else "serial"
        if self.ray_address is not None:
            return "ray"
        return "processes" if self.workers > 1 else "serial"

    @property
    def threads(self) -> int:
        """Torch threads in each run on a worker."""
        return self.threads_per_run or 1


# -- one run on a worker ------------------------------------------------------------------------
@dataclass
class _Task:
    experiment: str
    run_id: str
    config: Any
    execute: Callable[[Run], None]
    root: str
    where: tuple[str, int, int]  # the driver's host, the store root's device and inode
    transport: str
    lease_seconds: float
    threads: int
    source: Any = None  # fetch(experiment, run_id): a finished run of the driver's store
    seed: dict | None = None  # the run as the store has it (to resume), for a private store


@dataclass
class _Outcome:
    run_id: str
    error: str | None = None
    marked: bool = True  # the run's status was written (in the store, or in its bundle)
    bundles: list = field(default_factory=list)  # the runs written in a private store
    directory: str = ""  # where the worker wrote the run
    pid: int = 0


@dataclass
class _Crash:
    """The worker executing a run died before it answered."""

    message: str


_STORES: dict[tuple[str, float], RunStore] = {}


def _where(root: os.PathLike | str) -> tuple[str, int, int]:
    st = os.stat(root)
    return socket.gethostname(), st.st_dev, st.st_ino


def _sees_store(task: _Task) -> bool:
    if task.transport == "driver":
        return False
    try:
        same = _where(task.root) == tuple(task.where)
    except OSError:
        same = False
    if task.transport == "direct" and not same:
        raise RuntimeError(
            f"transport 'direct', but this worker ({socket.gethostname()}) does not see the "
            f"store {task.root} of {task.where[0]}"
        )
    return same


class _StagingStore(RunStore):
    """A worker's private store: finished runs it lacks are fetched from the driver's store
    (``source``); :attr:`begun` lists the runs executed here, to be sent back."""

    def __init__(self, root: str, lease_seconds: float, source: Any) -> None:
        super().__init__(root, lease_seconds)
        self.source = source
        self.begun: list[tuple[str, str]] = []
        self._asked: set[tuple[str, str]] = set()

    def begin(self, experiment: str, config: Any, parent: Run | None = None) -> Run:
        run = super().begin(experiment, config, parent)
        if (experiment, run.run_id) not in self.begun:
            self.begun.append((experiment, run.run_id))
        return run

    def open(self, experiment: str, config: Any) -> Run | None:
        key = (experiment, config_id(config))
        if self.source is not None and key not in self._asked and self.status(*key) != "done":
            self._asked.add(key)
            bundle = self.source.fetch(*key)
            if bundle is not None:
                self.ingest(bundle)
        return super().open(experiment, config)


class _StoreReader:
    """Reads finished runs of the store at ``root`` as bundles (:meth:`RunStore.pack`)."""

    def __init__(self, root: str) -> None:
        self.root = str(root)
        self._store: RunStore | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])

    def fetch(self, experiment: str, run_id: str) -> dict | None:
        if self._store is None:
            self._store = RunStore(self.root)
        if self._store.status(experiment, run_id) != "done":
            return None
        return self._store.pack(experiment, run_id)


class _RayReader:
    """A :class:`_StoreReader` running as a Ray actor on the driver's node."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def fetch(self, experiment: str, run_id: str) -> dict | None:
        import ray

        return ray.get(self.actor.fetch.remote(experiment, run_id))


def _execute_task(task: _Task) -> _Outcome:
    import torch

    torch.set_num_threads(task.threads)
    if _sees_store(task):
        key = (task.root, task.lease_seconds)
        if key not in _STORES:
            _STORES[key] = RunStore(task.root, task.lease_seconds)
        store = _STORES[key]
        error, _ = execute_run(store, task.experiment, task.config, task.execute)
        directory = str(store.root / task.experiment / task.run_id)
        return _Outcome(task.run_id, error, directory=directory, pid=os.getpid())
    private = tempfile.mkdtemp(prefix="winnow-run-")
    try:
        staging = _StagingStore(private, task.lease_seconds, task.source)
        if task.seed is not None:
            staging.ingest(task.seed)
        error, _ = execute_run(staging, task.experiment, task.config, task.execute)
        main = (task.experiment, task.run_id)
        order = [key for key in staging.begun if key != main] + [main]
        bundles = [staging.pack(*key) for key in order]
        directory = str(staging.root / task.experiment / task.run_id)
        staging.close()
        return _Outcome(task.run_id, error, bundles=bundles, directory=directory, pid=os.getpid())
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _run_task(task: _Task) -> _Outcome:
    """What a worker runs: :func:`_execute_task`, with an error outside the run (the store
    out of reach, say) returned as the run's failure."""
    try:
        return _execute_task(task)
    except Exception as err:  # noqa: BLE001 (it is the run's outcome)
        return _Outcome(task.run_id, _one_line(err), marked=False, pid=os.getpid())


# -- engines ------------------------------------------------------------------------------------
def _watch_parent(parent: int) -> None:
    """End this worker when the driver that started it is gone (its runs' leases are gone
    with it: another driver may redo them)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _stop_worker(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # the run in progress is marked interrupted on the way out


def _worker_main(conn: Any, env: dict[str, str]) -> None:
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    signal.signal(signal.SIGTERM, _stop_worker)  # how the driver stops it
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            task = None
        if task is None:
            break
        conn.send(_run_task(task))
    # Every run's results are in the store (or were sent back) by now: end at once rather than
    # finalise an interpreter holding torch, which takes about a second the driver waits for,
    # after what multiprocessing does when a process's target returns (its finalizers: the
    # semaphores it registered, children).
    logging.shutdown()
    multiprocessing.util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclass
class _Slot:
    process: Any
    conn: Any
    run_id: str | None = None


class _Processes:
    """``workers`` local processes (``spawn``), each executing one task at a time; a worker
    that dies is reported (:class:`_Crash`) and replaced."""

    def __init__(self, workers: int, gpus_per_run: float) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.gpus = int(gpus_per_run)
        self.devices: list[str] = []
        if self.gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None:
                self.devices = [d for d in visible.split(",") if d.strip()]
            else:
                import torch

                self.devices = [str(i) for i in range(torch.cuda.device_count())]
            if len(self.devices) < workers * self.gpus:
                raise ValueError(
                    f"{workers} workers x {self.gpus} GPUs per run need "
                    f"{workers * self.gpus} GPUs; {len(self.devices)} are visible"
                )
        self.slots: list[_Slot] = []
        for number in range(workers):
            self.slots.append(self._start(number))

    def _start(self, number: int) -> _Slot:
        env = {}
        if self.gpus:
            mine = self.devices[number * self.gpus : (number + 1) * self.gpus]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        ours, theirs = self.context.Pipe()
        process = self.context.Process(
            target=_worker_main, args=(theirs, env), name=f"winnow-worker-{number}"
        )
        process.start()
        theirs.close()
        return _Slot(process, ours)

    def source(self, store: RunStore, transport: str) -> Any:
        return None if transport == "direct" else _StoreReader(str(store.root))

    def idle(self) -> int:
        return sum(slot.run_id is None for slot in self.slots)

    def submit(self, run_id: str, task: _Task) -> None:
        slot = next(slot for slot in self.slots if slot.run_id is None)
        slot.conn.send(task)
        slot.run_id = run_id

    def wait(self, timeout: float) -> list[tuple[str, _Outcome | _Crash]]:
        busy = [slot for slot in self.slots if slot.run_id is not None]
        if not busy:
            time.sleep(timeout)
            return []
        ready = set(wait_for([s.conn for s in busy] + [s.process.sentinel for s in busy], timeout))
        results: list[tuple[str, _Outcome | _Crash]] = []
        for number, slot in enumerate(self.slots):
            if slot.run_id is None or not ({slot.conn, slot.process.sentinel} & ready):
                continue
            try:
                if slot.conn.poll():
                    results.append((slot.run_id, slot.conn.recv()))
                    slot.run_id = None
                    continue
            except (EOFError, OSError):
                pass
            slot.process.join(5)
            code = slot.process.exitcode
            results.append((slot.run_id, _Crash(f"its worker died (exit code {code})")))
            slot.conn.close()
            self.slots[number] = self._start(number)
        return results

    def cancel_all(self) -> None:
        for slot in self.slots:
            if slot.run_id is not None and slot.process.is_alive():
                slot.process.terminate()
        for slot in self.slots:
            if slot.run_id is not None:
                slot.process.join(10)
                if slot.process.is_alive():
                    slot.process.kill()
                    slot.process.join(5)

    def close(self) -> None:
        for slot in self.slots:
            try:
                slot.conn.send(None)
            except (OSError, ValueError):
                pass
        for slot in self.slots:
            slot.process.join(10)
            if slot.process.is_alive():
                slot.process.terminate()
                slot.process.join(5)
            slot.conn.close()


def _python_path() -> str:
    """The driver's module search path, for the workers of a Ray instance it starts (so a
    run function importable in the driver is importable there)."""
    entries = [os.getcwd() if not entry else entry for entry in sys.path]
    return os.pathsep.join(dict.fromkeys(entries))


class _Ray:
    """Runs as Ray tasks (``num_cpus=threads``, ``num_gpus=gpus``), at most ``workers`` in
    flight; Ray is started for the sweep unless it is initialised or an address is given."""

    def __init__(self, workers: int, address: str | None, threads: int, gpus: float) -> None:
        try:
            import ray
        except ImportError as err:
            raise ImportError(
                "the ray engine needs Ray: pip install 'winnow[ray]' (or use the processes "
                "engine, the default)"
            ) from err
        self.ray = ray
        self.workers = workers
        self.owned = False
        if not ray.is_initialized():
            options: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.ERROR,
            }
            if address is not None:
                ray.init(address=address, **options)
            else:
                # The module search path reaches the workers through the environment Ray's
                # processes inherit, not a runtime_env: a runtime_env makes Ray start new
                # workers for it instead of the ones it starts with (1.5 s more, measured).
                saved = os.environ.get("PYTHONPATH")
                os.environ["PYTHONPATH"] = _python_path()
                try:
                    ray.init(num_cpus=workers * threads, **options)
                finally:
                    if saved is None:
                        del os.environ["PYTHONPATH"]
                    else:
                        os.environ["PYTHONPATH"] = saved
            self.owned = True
        self.task = ray.remote(_run_task).options(
            num_cpus=threads, num_gpus=gpus, max_retries=0, name="winnow-run"
        )
        self.refs: dict[Any, str] = {}
        self.reader: Any = None

    def source(self, store: RunStore, transport: str) -> Any:
        if transport == "direct":
            return None
        nodes = [node for node in self.ray.nodes() if node.get("Alive")]
        if transport == "auto" and len(nodes) <= 1:
            return None  # every worker is on the driver's machine: they write directly
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = self.ray.get_runtime_context().get_node_id()
        actor = self.ray.remote(num_cpus=0)(_StoreReader)
        strategy = NodeAffinitySchedulingStrategy(node_id=here, soft=False)
        self.reader = actor.options(scheduling_strategy=strategy).remote(str(store.root))
        return _RayReader(self.reader)

    def idle(self) -> int:
        return self.workers - len(self.refs)

    def submit(self, run_id: str, task: _Task) -> None:
        self.refs[self.task.remote(task)] = run_id

    def wait(self, timeout: float) -> list[tuple[str, _Outcome | _Crash]]:
        if not self.refs:
            time.sleep(timeout)
            return []
        ready, rest = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready and rest:  # and whatever else has ended meanwhile
            ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        results: list[tuple[str, _Outcome | _Crash]] = []
        for ref in ready:
            run_id = self.refs.pop(ref)
            try:
                results.append((run_id, self.ray.get(ref)))
            except self.ray.exceptions.RayTaskError as err:  # the task itself raised
                cause = err.cause if isinstance(err.cause, BaseException) else err
                results.append((run_id, _Outcome(run_id, _one_line(cause), marked=False)))
            except self.ray.exceptions.RayError as err:  # its worker or node died
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                results.append((run_id, _Crash(f"its Ray worker died ({type(err).__name__}) "
                                               f"{first}".strip())))  # fmt: skip
        return results

    def cancel_all(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)
        for ref in self.refs:
            try:
                self.ray.get(ref, timeout=10)
            except Exception:  # noqa: BLE001 (cancelled: any error is the expected end)
                pass
        self.refs.clear()

    def close(self) -> None:
        if self.reader is not None:
            self.ray.kill(self.reader)
        if self.owned:
            self.ray.shutdown()


# -- the driver ---------------------------------------------------------------------------------
def _handle(store: RunStore, experiment: str, run_id: str, config: Any) -> Run:
    return Run(store, experiment, run_id, config, store.run_dir(experiment, run_id))


def run_parallel(
    store: RunStore,
    experiment: str,
    configs: Sequence[Any],
    run: Callable[[Run], None],
    parallel: Parallel,
    progress: bool = True,
) -> SweepSummary:
    """Run ``run`` once for each configuration of ``configs`` not done yet, ``parallel.workers``
    at once on the engine ``parallel`` names; what :func:`~winnow.experiments.runner.run_sweep`
    does, with the same store, statuses and summary.

    ``run`` and the configurations must pickle (a function defined at the top of a module the
    workers can import). Each run is claimed before it is handed to a worker and its lease
    renewed while it runs; a run another process holds is waited for; a run whose worker died
    is started again once its lease expired (at most ``parallel.max_attempts`` times, then it
    is marked failed). One progress bar shows the runs done, running, waiting and failed, and
    the time left. A ``KeyboardInterrupt`` stops the workers, marks their runs interrupted and
    is re-raised.
    """
    unique = unique_configs(configs)
    if parallel.kind == "ray":
        engine: Any = _Ray(
            parallel.workers, parallel.ray_address, parallel.threads, parallel.gpus_per_run
        )
    else:
        engine = _Processes(parallel.workers, parallel.gpus_per_run)
    try:
        driver = _Driver(store, experiment, unique, run, parallel, engine)
        with SweepProgress(experiment, len(unique), progress) as bar:
            return driver.drive(bar)
    finally:
        engine.close()


class _Driver:
    def __init__(
        self,
        store: RunStore,
        experiment: str,
        unique: dict[str, Any],
        run: Callable[[Run], None],
        parallel: Parallel,
        engine: Any,
    ) -> None:
        self.store, self.experiment, self.unique, self.run = store, experiment, unique, run
        self.parallel, self.engine = parallel, engine
        self.where = _where(store.root)
        self.source = engine.source(store, parallel.transport)
        self.summary = SweepSummary()
        self.leases: dict[str, Lease] = {}  # the runs in flight, under this driver's leases
        self.crashes: Counter = Counter()

    def drive(self, bar: SweepProgress) -> SweepSummary:
        pending = deque(self.unique)
        held: dict[str, float] = {}  # run id -> when to claim it again
        try:
            while pending or held or self.leases:
                while pending and self.engine.idle() > 0:
                    run_id = pending.popleft()
                    wait = self._start(run_id, bar)
                    if wait is not None:
                        held[run_id] = time.monotonic() + wait
                bar.show(running=len(self.leases), waiting=len(held))
                timeout = 0.5
                if not self.leases and held:  # nothing runs: sleep until a claim may succeed
                    timeout = max(0.0, min(min(held.values()) - time.monotonic(), 0.5))
                for run_id, result in self.engine.wait(timeout):
                    if self._settle(run_id, result, bar):
                        pending.append(run_id)  # claimed again once its lease expired
                now = time.monotonic()
                for run_id, at in list(held.items()):
                    if at <= now:
                        del held[run_id]
                        pending.append(run_id)
        except BaseException:
            self._interrupted()
            raise
        return self.summary

    def _start(self, run_id: str, bar: SweepProgress) -> float | None:
        """Claim the run and hand it to a worker; how long to wait before claiming it again if
        another process holds it (None otherwise). The lease is a driver's: its workers may
        outlive it a moment, so it is free only once it expires."""
        claim = self.store.claim(self.experiment, run_id, owner=new_owner(executes=False))
        if claim.state == "done":
            self.summary.skipped += 1
            bar.ended(run_id)
            return None
        if claim.lease is None:
            return claim.wait_seconds(self.store.lease_seconds)
        config = self.unique[run_id]
        if self.crashes[run_id] >= self.parallel.max_attempts:
            error = (
                f"WorkerDied: the worker executing it died {self.crashes[run_id]} times "
                "(killed, or out of memory)"
            )
            with claim.lease:
                self.store.begin(self.experiment, config).fail(error)
            self._failed(run_id, error, bar)
            return None
        seed = None
        if self.parallel.transport != "direct" and self.store.status(
            self.experiment, run_id
        ) not in (None, "done"):
            seed = self.store.pack(self.experiment, run_id)  # resumed where it stopped
        task = _Task(
            self.experiment, run_id, config, self.run, str(self.store.root), self.where,
            self.parallel.transport, self.store.lease_seconds, self.parallel.threads,
            self.source, seed,
        )  # fmt: skip
        self.leases[run_id] = claim.lease.keep_alive()
        try:
            self.engine.submit(run_id, task)
        except BaseException:
            self.leases.pop(run_id).release()
            raise
        return None

    def _settle(self, run_id: str, result: _Outcome | _Crash, bar: SweepProgress) -> bool:
        """Take a task's result into the store and the summary; True if the run is to be
        claimed again (its worker died)."""
        lease = self.leases.pop(run_id)
        if isinstance(result, _Crash):
            lease.stop()  # not released: it expires, as the lease of any dead holder does
            self.crashes[run_id] += 1
            tqdm.write(
                f"{self.experiment}/{run_id}: {result.message}; it is started again once its "
                "lease expires",
                file=sys.stderr,
            )
            return True
        try:
            if lease.lost:
                error = (
                    "LeaseLost: its lease expired while it ran (this driver stalled), another "
                    "process may have taken it over; its results are not taken"
                )
                self._failed(run_id, error, bar)
                return False
            error = result.error
            for bundle in result.bundles[:-1]:  # runs it needed and executed on the way
                self._ingest_needed(bundle)
            if result.bundles:
                self.store.ingest(result.bundles[-1])
            if error is not None and not result.marked:
                self.store.begin(self.experiment, self.unique[run_id]).fail(error)
        finally:
            lease.release()
        if error is None:
            self.summary.ran += 1
            bar.ended(run_id)
        else:
            self._failed(run_id, error, bar)
        return False

    def _ingest_needed(self, bundle: dict) -> None:
        """Take a run a worker executed because its run needed it, unless the store has it
        done already or another process executes it now."""
        owner = new_owner(executes=False)
        claim = self.store.claim(bundle["experiment"], bundle["run_id"], owner=owner)
        if claim.lease is not None:
            with claim.lease:
                self.store.ingest(bundle)

    def _failed(self, run_id: str, error: str, bar: SweepProgress) -> None:
        self.summary.failed.append((run_id, error))
        bar.ended(run_id, error)

    def _interrupted(self) -> None:
        """Stop the workers; mark the runs they executed 'interrupted' and drop their leases."""
        try:
            self.engine.cancel_all()
        finally:
            for run_id, lease in self.leases.items():
                try:
                    lease.stop()
                    if self.store.status(self.experiment, run_id) == "running":
                        _handle(
                            self.store, self.experiment, run_id, self.unique[run_id]
                        ).interrupted()
                    lease.release()
                except Exception:  # noqa: BLE001 (the lease then expires on its own)
                    pass
            self.leases.clear()
