"""The run store: run directories, their files, and one SQLite index over them.

A run is identified by ``(experiment, run_id)`` where ``run_id = config_id(config)``
(:mod:`winnow.experiments.configs`). Its files live in ``<root>/<experiment>/<run_id>/`` and
are the source of truth: ``config.json`` (the configuration and the run it branches from),
``status.json`` (running, done, failed, interrupted), one ``records/<kind>/<step>.json`` per
record, and whatever the run writes. ``<root>/winnow.sqlite`` indexes them
(:mod:`winnow.experiments.index`: WAL mode, safe for several writing processes, every row
checksummed) so a sweep can be queried and its report rebuilt; ``winnow experiment repair``
rebuilds the index from the files.

A run is executed under a *lease* (:meth:`RunStore.claim`): one row of the index naming the
process that executes it and until when, taken in one transaction only if the run is not done
and no other live holder has it, renewed by a heartbeat thread while the run executes
(:class:`Lease`), so two processes never execute one run at once, and a process that dies loses
its runs when their leases expire. A run's directory and rows can travel as bytes
(:meth:`RunStore.pack`) and be written into another store (:meth:`RunStore.ingest`): how a
worker that shares no file system with the store hands its run back.

Every file is written to a temporary name and renamed (:func:`winnow.io.atomic_write_bytes`),
so a crash never leaves half a file behind. A record can name the files its step wrote: their
digests are stored with it, and :meth:`Run.completed` counts a step as done only while those
files are intact, so a damaged or replaced file is recomputed on resume instead of trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from torch import Tensor

from winnow.experiments import index as idx
from winnow.experiments.configs import config_id, config_to_dict, flatten
from winnow.experiments.index import StoreError
from winnow.io import atomic_write_bytes, dumps, load_tensors, save_tensors, to_json

STATUSES = ("running", "done", "failed", "interrupted")
"""The statuses a run can have in the store."""

DATABASE_NAME = "winnow.sqlite"
LEASE_SECONDS = 60.0
"""How long a lease lasts unless renewed; its holder renews it every third of that."""
RESERVED_KEYS = frozenset({"run_id", "kind", "step"})
"""Keys that :meth:`RunStore.records` adds to every row; a record's data may not use them."""

__all__ = [
    "DATABASE_NAME",
    "LEASE_SECONDS",
    "STATUSES",
    "Claim",
    "Lease",
    "Run",
    "RunStore",
    "StoreError",
    "check_store",
    "file_digest",
    "holder_is_gone",
    "new_owner",
    "repair_store",
]


def _jsonable(value: Any, where: str) -> Any:
    """Data for a record or a JSON file: NaN and infinities become ``None``."""
    return to_json(value, where)


def _dumps(value: Any, indent: int | None = None) -> str:
    """Strict JSON (no NaN), compact unless indented; keys in their own order."""
    return dumps(value, indent=indent, sort_keys=False)


def _check_name(name: str, what: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"{what} {name!r} is not a valid directory name")


def _check_status(status: str | None) -> None:
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file's bytes, or None if it cannot be read."""
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    except OSError:
        return None
    return sha.hexdigest()


class RunStore:
    """Runs, their files and their records under one results root.

    ``root/winnow.sqlite`` indexes the runs (configuration, status, times, error, parent) and
    their records (one JSON row per ``(run, kind, step)``); run files live in
    ``root/<experiment>/<run_id>/``. A damaged index raises :class:`StoreError` naming the
    file (``winnow experiment check`` / ``repair``). A store can be pickled to another
    process; it reconnects there. ``lease_seconds``: how long the leases this store takes
    last unless renewed (:meth:`claim`).
    """

    def __init__(self, root: str | os.PathLike, lease_seconds: float = LEASE_SECONDS):
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, not {lease_seconds!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.database = self.root / DATABASE_NAME
        self.lease_seconds = float(lease_seconds)
        self.index = idx.Index(self.database, self.root)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "lease_seconds": self.lease_seconds}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state.get("lease_seconds", LEASE_SECONDS))

    def close(self) -> None:
        """Close this process's database connection (the next operation reopens it)."""
        self.index.close()

    def run_dir(self, experiment: str, run_id: str) -> Path:
        """The directory of a run, ``root/experiment/run_id`` (created)."""
        _check_name(experiment, "experiment")
        _check_name(run_id, "run id")
        path = self.root / experiment / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- runs ----------------------------------------------------------------------------------
    def begin(self, experiment: str, config: Any, parent: Run | None = None) -> Run:
        """Start (or restart) the run of ``config`` in ``experiment``; its status is 'running'.

        Writes ``config.json`` and ``status.json`` into the run directory, then upserts the
        run's row. A run that already exists keeps its ``started`` time and its records (so it
        can resume). ``parent``: the run this one branches from (a control of a lottery ticket)
        or builds on (a shared artefact such as pretrained weights), recorded with the run.
        """
        run_id = config_id(config)
        directory = self.run_dir(experiment, run_id)
        fields = config_to_dict(config)
        link = None if parent is None else f"{parent.experiment}/{parent.run_id}"
        document = {
            "experiment": experiment,
            "run_id": run_id,
            "type": type(config).__name__,
            "config": fields,
            "parent": link,
        }
        atomic_write_bytes(directory / "config.json", _dumps(document, indent=2).encode())
        run = Run(self, experiment, run_id, config, directory)
        with self.index.connection() as db:
            row = db.execute(
                "SELECT started FROM runs WHERE experiment = ? AND run_id = ?",
                (experiment, run_id),
            ).fetchone()
        started = row[0] if row and row[0] is not None else time.time()
        run._write_status("running", started=started, parent=link, config=_dumps(fields))
        return run

    def open(self, experiment: str, config: Any) -> Run | None:
        """A handle on the run of ``config`` in ``experiment`` if the store has one (any
        status), without changing it; None otherwise."""
        run_id = config_id(config)
        if self.status(experiment, run_id) is None:
            return None
        return Run(self, experiment, run_id, config, self.run_dir(experiment, run_id))

    def require(self, experiment: str, config: Any, needed_by: str) -> Run:
        """The finished run of ``config``; ``RuntimeError`` naming it and what needs it
        (``needed_by``: "the reinit control needs its ticket run") if it is not done."""
        found = self.open(experiment, config)
        if found is None or self.status(experiment, found.run_id) != "done":
            raise RuntimeError(
                f"{needed_by} {experiment}/{config_id(config)} finished first (run it before)"
            )
        return found

    def ensure(
        self,
        experiment: str,
        config: Any,
        execute: Callable[[Run], None],
        parent: Run | None = None,
        intact: Callable[[Run], bool] | None = None,
    ) -> Run:
        """The finished run of ``config``, executing it first if it is not done: a shared
        artefact (pretrained weights, learned gates) as a run of its own, with a status,
        records and files, resumed like any run. ``intact(run)`` says whether a finished run's
        files are still sound (:meth:`Run.intact`); one that is not is run again. A failure
        marks it failed and re-raises.

        The run is executed under its lease (:meth:`claim`): while another process executes
        it, this one waits for it to end (or for its lease to expire) and uses its result."""
        run_id = config_id(config)
        while True:
            found = self._finished(experiment, config, intact)
            if found is not None:
                return found
            claim = self.claim(experiment, run_id, redo=True)
            if claim.lease is None:  # another process executes it: wait for it
                time.sleep(claim.wait_seconds(self.lease_seconds))
                continue
            with claim.lease:
                found = self._finished(experiment, config, intact)  # done while we waited
                if found is not None:
                    return found
                run = self.begin(experiment, config, parent)
                try:
                    execute(run)
                except BaseException as err:
                    if isinstance(err, Exception):
                        run.fail(f"{type(err).__name__}: {err}")
                    else:
                        run.interrupted()
                    raise
                run.finish()
                return run

    def _finished(
        self, experiment: str, config: Any, intact: Callable[[Run], bool] | None
    ) -> Run | None:
        found = self.open(experiment, config)
        if found is not None and self.status(experiment, found.run_id) == "done":
            if intact is None or intact(found):
                return found
        return None

    # -- leases --------------------------------------------------------------------------------
    def claim(
        self,
        experiment: str,
        run_id: str,
        owner: str | None = None,
        redo: bool = False,
        seconds: float | None = None,
    ) -> Claim:
        """Claim the run ``experiment/run_id`` for one process, in one transaction.

        Returns a :class:`Claim` whose ``state`` is ``"claimed"`` (its ``lease`` is now held
        by ``owner``, a new id if None, for ``seconds``, the store's ``lease_seconds`` if
        None), ``"done"`` (the run is finished; never claimed unless ``redo``) or ``"held"``
        (another owner's lease has not expired: ``holder`` and ``expires`` say whose and
        until when). An expired lease is taken over: its holder died or stopped renewing it;
        so is the lease of a process of this host that executed its runs itself and is gone
        (:func:`holder_is_gone`: a serial sweep killed with SIGKILL is resumed at once).
        Use the lease as a context manager (renewed by a heartbeat thread inside, released at
        the end)."""
        _check_name(experiment, "experiment")
        _check_name(run_id, "run id")
        seconds = self.lease_seconds if seconds is None else float(seconds)
        owner = owner or new_owner()
        state, holder, expires = idx.claim(
            self.index, experiment, run_id, owner, time.time() + seconds, redo=redo,
            gone=holder_is_gone,
        )  # fmt: skip
        lease = Lease(self, experiment, run_id, owner, seconds) if state == "claimed" else None
        return Claim(state, lease, holder, expires)

    def lease(self, experiment: str, run_id: str) -> tuple[str, float] | None:
        """``(owner, expires)`` of the run's lease, or None (an expired lease may remain)."""
        return idx.lease_of(self.index, experiment, run_id)

    # -- runs as bytes ---------------------------------------------------------------------------
    def pack(self, experiment: str, run_id: str) -> dict[str, Any]:
        """The run ``experiment/run_id`` as plain data: its row, its records' rows and every
        file of its directory as bytes (temporary files aside), for :meth:`ingest` into
        another store. The rows are verified against their checksums."""
        row = self._run_row(experiment, run_id)
        if row is None:
            raise KeyError(f"no run {experiment}/{run_id} in {self.root}")
        _, _, config, status, error, parent, started, finished, _ = row
        with self.index.connection() as db:
            rows = db.execute(
                "SELECT experiment, run_id, kind, step, data, files, checksum FROM records "
                "WHERE experiment = ? AND run_id = ? ORDER BY kind, step",
                (experiment, run_id),
            ).fetchall()
        records = [list(self.index.verified_record(r)[2:6]) for r in rows]
        directory = self.run_dir(experiment, run_id)
        files = {}
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory)
            if any(part.startswith(".") for part in relative.parts):
                continue  # a temporary file of an atomic write
            if path.is_file() and not path.is_symlink():
                files[relative.as_posix()] = path.read_bytes()
        return {
            "experiment": experiment,
            "run_id": run_id,
            "run": {
                "config": config, "status": status, "error": error, "parent": parent,
                "started": started, "finished": finished,
            },
            "records": records,
            "files": files,
        }  # fmt: skip

    def ingest(self, bundle: Mapping[str, Any]) -> None:
        """Write a run :meth:`pack` made (in another store, another process, another machine)
        into this store, replacing what this store has of that run.

        Its files are written first (each atomically; record files the bundle lacks are
        removed with their rows), then its records' rows, then ``status.json`` and the run's
        row last: a crash halfway leaves the run as it was, or with the new files and its old
        status (so it is redone). Each row is written with its checksum; a bundle whose paths
        leave the run directory, or whose records disagree with their files, is refused."""
        experiment, run_id = bundle["experiment"], bundle["run_id"]
        directory = self.run_dir(experiment, run_id)
        files: Mapping[str, bytes] = bundle["files"]
        for name in files:
            parts = PurePosixPath(name).parts
            if (
                not parts or PurePosixPath(name).is_absolute() or ".." in parts
                or any(p.startswith(".") for p in parts) or "\\" in name
            ):  # fmt: skip
                raise ValueError(f"a packed run names a file outside its directory: {name!r}")
        records = {}
        for kind, step, data, digests in bundle["records"]:
            _check_name(kind, "record kind")
            name = f"records/{kind}/{int(step)}.json"
            document = json.loads(files.get(name, b"null"))
            expected = {"data": json.loads(data), "files": None if digests is None
                        else json.loads(digests)}  # fmt: skip
            if document != expected:
                raise ValueError(f"packed run {experiment}/{run_id}: {name} disagrees with its row")
            records[name] = (kind, int(step), data, digests)
        for name, content in files.items():
            parts = PurePosixPath(name).parts
            if name != "status.json" and not (len(parts) == 3 and parts[0] == "records"):
                atomic_write_bytes(directory / name, content)  # record files come with rows
        run = Run(self, experiment, run_id, None, directory)
        with self.index.connection() as db:
            stale = db.execute(
                "SELECT kind, step FROM records WHERE experiment = ? AND run_id = ?",
                (experiment, run_id),
            ).fetchall()
        for kind, step in stale:
            if f"records/{kind}/{step}.json" not in records:
                run.forget(kind, [step])
        for path in (directory / "records").glob("*/*.json"):
            if path.relative_to(directory).as_posix() not in records:
                path.unlink(missing_ok=True)
        for name, (kind, step, data, digests) in records.items():
            atomic_write_bytes(directory / name, files[name])
            with self.index.connection() as db:
                idx.write_record(db, experiment, run_id, kind, step, data, digests)
        state = bundle["run"]
        if "status.json" in files:
            atomic_write_bytes(directory / "status.json", files["status.json"])
        with self.index.connection() as db:
            idx.write_run(
                db, experiment, run_id, state["config"], state["status"], state["started"],
                state["finished"], state["error"], state["parent"],
            )  # fmt: skip

    def status(self, experiment: str, run_id: str) -> str | None:
        """The status of a run ('running', 'done', 'failed', 'interrupted'), or None."""
        row = self._run_row(experiment, run_id)
        return row[3] if row else None

    def _run_row(self, experiment: str, run_id: str) -> tuple | None:
        with self.index.connection() as db:
            row = db.execute(
                f"SELECT {idx.RUN_COLUMNS} FROM runs WHERE experiment = ? AND run_id = ?",
                (experiment, run_id),
            ).fetchone()
        return None if row is None else self.index.verified_run(row)

    def runs(self, experiment: str, status: str | None = None) -> list[dict[str, Any]]:
        """The runs of an experiment (optionally with one status), oldest first.

        Each is a dict with ``run_id``, ``status``, ``config`` (a dict), ``started``,
        ``finished`` (Unix times), ``error`` and ``parent`` (``experiment/run_id``, or None).
        """
        _check_status(status)
        query = f"SELECT {idx.RUN_COLUMNS} FROM runs WHERE experiment = ?"
        query += " AND status = ?" if status else ""
        query += " ORDER BY started, run_id"
        params = (experiment, status) if status else (experiment,)
        with self.index.connection() as db:
            rows = db.execute(query, params).fetchall()
        self._check_against_files(experiment, status, {row[1] for row in rows})
        out = []
        for row in rows:
            _, run_id, config, status_, error, parent, started, finished, _ = (
                self.index.verified_run(row)
            )
            out.append(
                {
                    "run_id": run_id,
                    "status": status_,
                    "config": json.loads(config),
                    "started": started,
                    "finished": finished,
                    "error": error,
                    "parent": parent,
                }
            )
        return out

    def records(
        self, experiment: str, kind: str | None = None, status: str | None = "done"
    ) -> list[dict[str, Any]]:
        """Every record of an experiment, as flat rows ready for :func:`aggregate`.

        Each row is the record's data plus ``run_id``, ``kind`` and ``step``, plus the run's
        configuration fields under their own names where the data has no such key (nested
        configurations as dotted keys, ``train.epochs``). ``kind`` filters on the kind;
        ``status`` keeps the runs with that status (None: any status). Ordered by run start,
        run id, kind and step. Every row's checksum is verified (:class:`StoreError`).
        """
        _check_status(status)
        query = (
            "SELECT r.experiment, r.run_id, r.kind, r.step, r.data, r.files, r.checksum, "
            + ", ".join(f"u.{c.strip()}" for c in idx.RUN_COLUMNS.split(","))
            + " FROM records AS r JOIN runs AS u "
            "ON r.experiment = u.experiment AND r.run_id = u.run_id WHERE r.experiment = ?"
        )
        params: list[Any] = [experiment]
        if kind is not None:
            query += " AND r.kind = ?"
            params.append(kind)
        if status is not None:
            query += " AND u.status = ?"
            params.append(status)
        query += " ORDER BY u.started, r.run_id, r.kind, r.step"
        with self.index.connection() as db:
            rows = db.execute(query, params).fetchall()
        self._check_against_files(
            experiment, status, records=Counter((r[1], r[2]) for r in rows), kind=kind
        )
        configs: dict[str, dict[str, Any]] = {}
        out = []
        for row in rows:
            _, run_id, kind_, step, data, _, _ = self.index.verified_record(row[:7])
            if run_id not in configs:
                self.index.verified_run(row[7:])
                configs[run_id] = flatten(json.loads(row[9]))
            record = {"run_id": run_id, "kind": kind_, "step": step, **json.loads(data)}
            for key, value in configs[run_id].items():
                record.setdefault(key, value)
            out.append(record)
        return out

    def _check_against_files(
        self,
        experiment: str,
        status: str | None,
        runs: set[str] | None = None,
        records: Counter | None = None,
        kind: str | None = None,
    ) -> None:
        """``StoreError`` if a query of the index returned fewer rows than the run directories
        (the source of truth) vouch for: rows a damaged database dropped have no checksum to
        fail. A run that ended wrote its status file with how many records of each kind it had
        then; a query of runs must have returned its row (``runs``: the run ids it returned),
        a query of records exactly that many of them (``records``: counts by
        ``(run_id, kind)``). ``status`` and ``kind`` are the
        query's filters. Runs of winnow 0.1 (no ``status.json``) and runs still going are not
        compared."""
        for status_file in (self.root / experiment).glob("*/status.json"):
            run_id = status_file.parent.name
            try:
                state = json.loads(status_file.read_text(encoding="utf-8"))
                ended, counts = state["status"] != "running", state.get("records")
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            if not ended or (status is not None and state["status"] != status):
                continue
            if records is None:  # a query of runs: each must be there
                lost = run_id not in runs
            elif isinstance(counts, dict):  # a query of records: as many as it had
                kinds = counts if kind is None else {kind: counts.get(kind, 0)}
                lost = any(records[run_id, k] != n for k, n in kinds.items())
            else:
                lost = False
            if lost:
                raise StoreError(
                    f"{self.database}: the index has lost rows of run {experiment}/{run_id} "
                    f"that its files vouch for (damaged); `winnow experiment repair --results "
                    f"{self.root}` rebuilds it from the run directories"
                )

    def config_keys(self, experiment: str) -> list[str]:
        """The configuration fields of the experiment's runs, flattened (``train.epochs``), in
        the order they first appear: what its runs' records carry besides their data."""
        keys: dict[str, None] = {}
        for run in self.runs(experiment):
            keys.update(dict.fromkeys(flatten(run["config"])))
        return list(keys)

    def experiments(self) -> list[str]:
        """The names of the experiments with at least one run, sorted."""
        with self.index.connection() as db:
            rows = db.execute("SELECT DISTINCT experiment FROM runs ORDER BY experiment")
            return [r[0] for r in rows.fetchall()]


def check_store(root: str | os.PathLike) -> list[str]:
    """What is wrong with the run store at ``root`` (empty: nothing found): SQLite's integrity
    check, every row's checksum, and runs the index and the run directories disagree on. Does
    not open the store (its index may be too damaged to open)."""
    root = Path(root)
    return idx.check(root / DATABASE_NAME, root)


def repair_store(root: str | os.PathLike) -> dict[str, int]:
    """Rebuild the index of the run store at ``root`` from its run directories (the files are
    the source of truth), replacing ``winnow.sqlite`` atomically; returns how many runs and
    records the new index holds. Nothing else may use the store while it is repaired."""
    root = Path(root)
    return idx.rebuild(root, root / DATABASE_NAME)


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


def new_owner(executes: bool = True) -> str:
    """A new lease owner id: the host, its process namespace, the process and a random part.

    ``executes``: the owner executes its runs in its own process (a serial sweep, a run's
    :meth:`RunStore.ensure`), so its lease is free as soon as that process is gone; a
    driver's runs execute in workers that may outlive it a moment (``executes=False``: its
    leases are free only when they expire)."""
    owner = f"{socket.gethostname()}/{_pid_namespace()}/{os.getpid()}/{secrets.token_hex(4)}"
    return owner if executes else owner + "/driver"


def holder_is_gone(owner: str) -> bool:
    """Whether a lease's owner is a process of this host (and process namespace) that executed
    its runs itself and no longer exists: its leases need not wait to expire."""
    parts = owner.split("/")
    if len(parts) != 4 or parts[0] != socket.gethostname() or parts[1] != _pid_namespace():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, OverflowError):  # alive under another user, or not a pid
        return False
    return False


class Lease:
    """A held claim on one run (:meth:`RunStore.claim`): ``with lease:`` renews it every third
    of its duration from a heartbeat thread and releases it at the end. A lease whose
    renewal finds it taken over (it had expired: this process stalled longer than its
    duration) is ``lost``."""

    def __init__(self, store: RunStore, experiment: str, run_id: str, owner: str, seconds: float):
        self.store, self.experiment, self.run_id = store, experiment, run_id
        self.owner, self.seconds = owner, seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Lease({self.experiment!r}, {self.run_id!r}, owner={self.owner!r})"

    def renew(self) -> bool:
        """Extend the lease by its duration from now; False (and ``lost``) if it is no longer
        this owner's."""
        expires = time.time() + self.seconds
        if not idx.renew(self.store.index, self.experiment, self.run_id, self.owner, expires):
            self.lost = True
        return not self.lost

    def keep_alive(self) -> Lease:
        """Start the heartbeat thread (it renews the lease until :meth:`stop`)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._beat, name=f"winnow-lease-{self.run_id}", daemon=True
            )
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self.renew():
                    return
            except Exception:  # noqa: BLE001 (a locked or damaged store: try again next beat)
                continue

    def stop(self) -> None:
        """Stop renewing the lease without releasing it: it expires in its time (what a
        driver does when the worker executing the run died)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def release(self) -> None:
        """Stop renewing the lease and drop it."""
        self.stop()
        idx.release(self.store.index, self.experiment, self.run_id, self.owner)

    def __enter__(self) -> Lease:
        return self.keep_alive()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@dataclass(frozen=True)
class Claim:
    """What :meth:`RunStore.claim` found: ``state`` "claimed" (``lease`` is held), "done" or
    "held" (by ``holder`` until ``expires``, a Unix time)."""

    state: str
    lease: Lease | None = None
    holder: str | None = None
    expires: float | None = None

    def wait_seconds(self, lease_seconds: float) -> float:
        """How long to wait before claiming again: until the holder's lease expires, at most
        a tenth of a lease (the holder may finish first), at least 50 ms."""
        left = (self.expires or 0.0) - time.time()
        return min(max(left, 0.05), max(lease_seconds / 10, 0.05))


class Run:
    """One run of an experiment, as returned by :meth:`RunStore.begin`.

    ``config`` is the configuration the run function reads; ``dir`` its directory. Records
    (:meth:`record`) go to a file of the run and to the index; files (:meth:`save_json`,
    :meth:`save_tensors`, or any writer given :meth:`path`) go to the directory, atomically.

    To resume inside a run, write a step's files first and record the step last, naming those
    files: the record is the commit point, and :meth:`completed` lists the steps committed
    whose files are intact.
    """

    def __init__(self, store: RunStore, experiment: str, run_id: str, config: Any, dir: Path):
        self.store = store
        self.experiment = experiment
        self.run_id = run_id
        self.config = config
        self.dir = dir

    def __repr__(self) -> str:
        return f"Run({self.experiment!r}, {self.run_id!r})"

    def record(
        self, kind: str, step: int, data: Mapping[str, Any], files: Iterable[str] = ()
    ) -> None:
        """Store ``data`` as the record ``(kind, step)`` of this run, replacing any earlier one.

        Values must be JSON-able; numpy and torch scalars (and small arrays) are converted to
        Python numbers, and NaN or infinite floats are stored as null. The keys ``run_id``,
        ``kind`` and ``step`` are reserved. ``files``: the run's files this step wrote; their
        SHA-256 is stored with the record, and :meth:`completed` checks it.
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"a record kind is a non-empty string, not {kind!r}")
        _check_name(kind, "record kind")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"a record step is an integer, not {type(step).__name__}")
        clash = RESERVED_KEYS.intersection(data)
        if clash:
            raise ValueError(f"record keys {sorted(clash)} are reserved")
        content = _jsonable(data, f"record {kind!r} step {step}")
        digests = None
        if files:
            digests = {name: file_digest(self.path(name)) for name in files}
            missing = [n for n, d in digests.items() if d is None]
            if missing:
                raise FileNotFoundError(f"record {kind!r} names files the run lacks: {missing}")
        text = _dumps(content)
        files_text = None if digests is None else dumps(digests)
        document = {"data": content, "files": digests}
        atomic_write_bytes(self.path(f"records/{kind}/{int(step)}.json"), _dumps(document).encode())
        with self.store.index.connection() as db:
            idx.write_record(db, self.experiment, self.run_id, kind, int(step), text, files_text)

    def completed(self, kind: str) -> dict[int, dict[str, Any]]:
        """The records of ``kind`` already stored for this run, by step (for resuming): the
        steps in order up to the first whose named files are missing or changed (that step
        and the ones after it are to be redone)."""
        with self.store.index.connection() as db:
            rows = db.execute(
                "SELECT experiment, run_id, kind, step, data, files, checksum FROM records "
                "WHERE experiment = ? AND run_id = ? AND kind = ? ORDER BY step",
                (self.experiment, self.run_id, kind),
            ).fetchall()
        done = {}
        for row in rows:
            _, _, _, step, data, files, _ = self.store.index.verified_record(row)
            if files is not None and any(
                file_digest(self.path(name)) != digest for name, digest in json.loads(files).items()
            ):
                break
            done[step] = json.loads(data)
        return done

    def resume(self, kind: str) -> dict[int, dict[str, Any]]:
        """:meth:`completed`, after dropping the records of the steps that come after it (a
        step whose files were damaged or replaced, and everything after it, is redone)."""
        done = self.completed(kind)
        with self.store.index.connection() as db:
            steps = [
                row[0]
                for row in db.execute(
                    "SELECT step FROM records WHERE experiment = ? AND run_id = ? AND kind = ?",
                    (self.experiment, self.run_id, kind),
                )
            ]
        self.forget(kind, [s for s in steps if s not in done])
        return done

    def intact(self, kind: str, steps: Iterable[int]) -> bool:
        """Whether every step of ``steps`` is recorded with its files intact."""
        done = self.completed(kind)
        return all(step in done for step in steps)

    def forget(self, kind: str, steps: Iterable[int]) -> None:
        """Drop the records ``(kind, step)`` for ``steps`` (steps to be redone)."""
        steps = [int(s) for s in steps]
        for step in steps:
            self.path(f"records/{kind}/{step}.json").unlink(missing_ok=True)
        with self.store.index.connection() as db:
            db.executemany(
                "DELETE FROM records WHERE experiment = ? AND run_id = ? AND kind = ? AND step = ?",
                [(self.experiment, self.run_id, kind, s) for s in steps],
            )

    def link(self, parent: Run) -> None:
        """Record that this run branches from (or builds on) ``parent``."""
        self._write_status(parent=f"{parent.experiment}/{parent.run_id}")

    def finish(self) -> None:
        """Mark the run 'done'."""
        self._write_status("done", finished=time.time())

    def fail(self, error: str) -> None:
        """Mark the run 'failed' with an error message."""
        self._write_status("failed", finished=time.time(), error=error)

    def interrupted(self) -> None:
        """Mark the run 'interrupted' (stopped by the user; a rerun resumes it)."""
        self._write_status("interrupted", finished=time.time())

    _UNSET = object()

    def _write_status(
        self,
        status: str | None = None,
        *,
        started: Any = _UNSET,
        finished: Any = None,
        error: str | None = None,
        parent: Any = _UNSET,
        config: str | None = None,
    ) -> None:
        """Write ``status.json`` then the run's row (its checksum included); unchanged fields
        are read from the row."""
        row = self.store._run_row(self.experiment, self.run_id)
        if row is not None:
            _, _, old_config, old_status, _, old_parent, old_started, _, _ = row
        else:
            old_config, old_status, old_parent, old_started = config, "running", None, None
        status = status or old_status
        started = old_started if started is self._UNSET else started
        parent = old_parent if parent is self._UNSET else parent
        config = config or old_config
        state = {"status": status, "started": started, "finished": finished, "error": error}
        if status == "running":
            state.update(finished=None, error=None)
            finished = error = None
        else:  # what a later read checks the index against
            with self.store.index.connection() as db:
                state["records"] = dict(db.execute(
                    "SELECT kind, count(*) FROM records WHERE experiment = ? AND run_id = ? "
                    "GROUP BY kind",
                    (self.experiment, self.run_id),
                ))  # fmt: skip
        atomic_write_bytes(self.path("status.json"), _dumps(state, indent=2).encode())
        with self.store.index.connection() as db:
            idx.write_run(
                db, self.experiment, self.run_id, config, status, started, finished, error,
                parent,
            )  # fmt: skip

    def path(self, name: str) -> Path:
        """The path of a file of this run (``name`` may hold subfolders, not leave the dir)."""
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{name!r} is not a path inside the run directory")
        return self.dir / name

    def has(self, name: str) -> bool:
        """Whether the run has a file called ``name``."""
        return self.path(name).is_file()

    def save_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as JSON (NaN as null), atomically; return the path."""
        path = self.path(name)
        text = _dumps(_jsonable(obj, name), indent=2)
        atomic_write_bytes(path, text.encode("utf-8"))
        return path

    def load_json(self, name: str) -> Any:
        """Read a JSON file of this run."""
        return json.loads(self.path(name).read_text(encoding="utf-8"))

    def save_tensors(
        self,
        name: str,
        tensors: Mapping[str, Tensor],
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write tensors to a checksummed safetensors file of this run (see
        :func:`winnow.io.save_tensors`; :func:`winnow.io.tensor_metadata` reads ``metadata``
        back)."""
        return save_tensors(self.path(name), tensors, metadata)

    def load_tensors(self, name: str) -> dict[str, Tensor]:
        """Read a tensor file of this run, verifying its checksum (see
        :func:`winnow.io.load_tensors`)."""
        return load_tensors(self.path(name))
