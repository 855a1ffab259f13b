"""The run store: typed configurations, their ids, run directories and one SQLite database.

A run is identified by ``(experiment, run_id)`` where ``run_id = config_id(config)``, a hash
of the configuration's non-default fields (OpenLTH's scheme, Frankle et al.): adding a field
with a default keeps every old id valid. Its files live in ``<root>/<experiment>/<run_id>/``;
its status and its metrics live in ``<root>/winnow.sqlite`` (WAL mode, safe for several
writing processes), so a sweep can be queried and its report rebuilt after the fact.

Every file is written to a temporary name and renamed (:func:`winnow.io.atomic_write_bytes`),
so a crash never leaves half a file behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from winnow.io import atomic_write_bytes, dumps, load_tensors, save_tensors, to_json

STATUSES = ("running", "done", "failed", "interrupted")
"""The statuses a run can have in the store."""

DATABASE_NAME = "winnow.sqlite"
RESERVED_KEYS = frozenset({"run_id", "kind", "step"})
"""Keys that :meth:`RunStore.records` adds to every row; a record's data may not use them."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    experiment TEXT NOT NULL,
    run_id TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    parent TEXT,
    PRIMARY KEY (experiment, run_id)
);
CREATE TABLE IF NOT EXISTS records (
    experiment TEXT NOT NULL,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (experiment, run_id, kind, step)
);
"""


# -- configurations --------------------------------------------------------------------------
def _jsonable(value: Any, where: str) -> Any:
    """Data for a record or a JSON file: NaN and infinities become ``None``."""
    return to_json(value, where)


def _check_config(config: Any) -> None:
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"a configuration is a dataclass instance, not {type(config).__name__}")


def _config_fields(config: Any) -> list[dataclasses.Field]:
    """The fields a configuration is built from (``init=False`` fields are derived ones)."""
    return [f for f in dataclasses.fields(config) if f.init]


def _as_declared(value: Any, hint: Any) -> Any:
    """An int given for a field declared ``float`` (or ``float | None``) as that float, so that
    ``epochs=3`` and ``epochs=3.0`` are one configuration with one id."""
    if isinstance(value, int) and not isinstance(value, bool):
        if hint is float or float in typing.get_args(hint):
            return float(value)
    return value


def _non_default(config: Any, where: str) -> dict[str, Any]:
    """The fields whose value differs from their default (nested configurations likewise)."""

    def canonical(value: Any, at: str) -> Any:
        return to_json(value, at, finite=False, dataclass=_identity)

    hints = typing.get_type_hints(type(config))
    out = {}
    for f in _config_fields(config):
        at = f"{where}.{f.name}"
        value = canonical(_as_declared(getattr(config, f.name), hints.get(f.name)), at)
        if f.default is not dataclasses.MISSING:
            default = canonical(f.default, at)
        elif f.default_factory is not dataclasses.MISSING:
            default = canonical(f.default_factory(), at)
        else:
            out[f.name] = value
            continue
        if value != default:
            out[f.name] = value
    return out


def _identity(config: Any, where: str) -> dict[str, Any]:
    """What identifies a configuration: its class name and its non-default fields."""
    return {"type": type(config).__name__, "fields": _non_default(config, where)}


def config_id(config: Any) -> str:
    """The id of a configuration: 12 hex digits of a SHA-256 of its non-default fields.

    ``config`` is a (frozen) dataclass instance. The hash covers the canonical JSON (sorted
    keys, compact) of ``{"type": class name, "fields": {name: value}}`` with only the fields
    whose value differs from their default (nested dataclasses likewise), so adding a field
    with a default keeps old ids valid, and two configurations that differ in any non-default
    value get different ids. Tuples count as lists.
    """
    _check_config(config)
    text = json.dumps(
        _identity(config, type(config).__name__), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def config_to_dict(config: Any) -> dict[str, Any]:
    """Every field of a configuration as plain JSON data (nested dataclasses as dicts)."""
    _check_config(config)
    return _all_fields(config, type(config).__name__)


def _all_fields(config: Any, where: str) -> dict[str, Any]:
    return {
        f.name: to_json(
            getattr(config, f.name), f"{where}.{f.name}", finite=False, dataclass=_all_fields
        )
        for f in _config_fields(config)
    }


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass type a field annotation names (directly or as ``X | None``), if any."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build a configuration of class ``cls`` from :func:`config_to_dict`'s output.

    Missing keys take their defaults; an unknown key raises ``ValueError`` naming it. Lists
    come back as tuples (configurations are frozen and hashable), and a field annotated with a
    dataclass type is rebuilt from its nested dict. The class's own validation runs as usual.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in _config_fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}")
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        hints = {}
    kwargs = {}
    for name, value in data.items():
        nested = _dataclass_in(hints.get(name))
        if nested is not None and isinstance(value, Mapping):
            kwargs[name] = config_from_dict(nested, value)
        else:
            kwargs[name] = _tuples(value)
    return cls(**kwargs)


def _check_name(name: str, what: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"{what} {name!r} is not a valid directory name")


# -- the store -------------------------------------------------------------------------------
class RunStore:
    """Runs, their files and their records under one results root.

    ``root/winnow.sqlite`` holds the ``runs`` table (one row per run: configuration, status,
    times, error) and the ``records`` table (one JSON row per ``(run, kind, step)``); run files
    live in ``root/<experiment>/<run_id>/``. The database is in WAL mode and every write is a
    single autocommitted statement, so several processes (and threads) can write at once
    without losing a row. A store can be pickled to another process; it reconnects there.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.database = self.root / DATABASE_NAME
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        with self._db() as db:
            _while_locked(lambda: self._create_schema(db))

    @staticmethod
    def _create_schema(db: sqlite3.Connection) -> None:
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
        if "parent" not in columns:  # a store written by winnow 0.1
            try:
                db.execute("ALTER TABLE runs ADD COLUMN parent TEXT")
            except sqlite3.OperationalError as err:  # another process added it first
                if "duplicate column" not in str(err):
                    raise

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """This process's connection (opened on first use, reopened after a fork)."""
        with self._lock:
            if self._conn is None or self._pid != os.getpid():
                conn = sqlite3.connect(
                    self.database, timeout=LOCK_TIMEOUT, isolation_level=None,
                    check_same_thread=False,
                )  # fmt: skip
                # switching a new database to WAL takes an exclusive lock that SQLite does not
                # wait for (several processes opening one fresh store got "database is locked")
                _while_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
                conn.execute("PRAGMA synchronous=NORMAL")
                self._conn, self._pid = conn, os.getpid()
            yield self._conn

    def close(self) -> None:
        """Close this process's database connection (the next operation reopens it)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def run_dir(self, experiment: str, run_id: str) -> Path:
        """The directory of a run, ``root/experiment/run_id`` (created)."""
        _check_name(experiment, "experiment")
        _check_name(run_id, "run id")
        path = self.root / experiment / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def begin(self, experiment: str, config: Any, parent: Run | None = None) -> Run:
        """Start (or restart) the run of ``config`` in ``experiment``; its status is 'running'.

        Writes ``config.json`` into the run directory, then upserts the run's row. A run that
        already exists keeps its ``started`` time and its records (so it can resume).
        ``parent``: the run this one branches from (a control of a lottery ticket) or builds
        on (a shared artefact such as pretrained weights), recorded with the run.
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
        with self._db() as db:
            db.execute(
                "INSERT INTO runs (experiment, run_id, config, status, started, parent) "
                "VALUES (?, ?, ?, 'running', ?, ?) "
                "ON CONFLICT (experiment, run_id) DO UPDATE SET config = excluded.config, "
                "status = 'running', finished = NULL, error = NULL, parent = excluded.parent",
                (experiment, run_id, _dumps(fields), time.time(), link),
            )
        return Run(self, experiment, run_id, config, directory)

    def open(self, experiment: str, config: Any) -> Run | None:
        """A handle on the run of ``config`` in ``experiment`` if the store has one (any
        status), without changing it; None otherwise."""
        run_id = config_id(config)
        if self.status(experiment, run_id) is None:
            return None
        return Run(self, experiment, run_id, config, self.run_dir(experiment, run_id))

    def require(self, experiment: str, config: Any, why: str) -> Run:
        """The finished run of ``config``; ``RuntimeError`` (saying ``why`` it is needed) if it
        is not done."""
        found = self.open(experiment, config)
        if found is None or self.status(experiment, found.run_id) != "done":
            raise RuntimeError(f"{why} needs run {experiment}/{config_id(config)} finished first")
        return found

    def ensure(
        self,
        experiment: str,
        config: Any,
        execute: Callable[[Run], None],
        parent: Run | None = None,
    ) -> Run:
        """The finished run of ``config``, executing it first if it is not done: a shared
        artefact (pretrained weights, learned gates) as a run of its own, with a status,
        records and files, resumed like any run. A failure marks it failed and re-raises."""
        found = self.open(experiment, config)
        if found is not None and self.status(experiment, found.run_id) == "done":
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

    def status(self, experiment: str, run_id: str) -> str | None:
        """The status of a run ('running', 'done', 'failed', 'interrupted'), or None."""
        with self._db() as db:
            row = db.execute(
                "SELECT status FROM runs WHERE experiment = ? AND run_id = ?",
                (experiment, run_id),
            ).fetchone()
        return row[0] if row else None

    def _set_status(self, experiment: str, run_id: str, status: str, error: str | None) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE runs SET status = ?, finished = ?, error = ? "
                "WHERE experiment = ? AND run_id = ?",
                (status, time.time(), error, experiment, run_id),
            )

    def runs(self, experiment: str, status: str | None = None) -> list[dict[str, Any]]:
        """The runs of an experiment (optionally with one status), oldest first.

        Each is a dict with ``run_id``, ``status``, ``config`` (a dict), ``started``,
        ``finished`` (Unix times), ``error`` and ``parent`` (``experiment/run_id``, or None).
        """
        _check_status(status)
        query = "SELECT run_id, status, config, started, finished, error, parent FROM runs "
        query += "WHERE experiment = ?" + (" AND status = ?" if status else "")
        query += " ORDER BY started, run_id"
        params = (experiment, status) if status else (experiment,)
        with self._db() as db:
            rows = db.execute(query, params).fetchall()
        keys = ("run_id", "status", "config", "started", "finished", "error", "parent")
        return [dict(zip(keys, (*r[:2], json.loads(r[2]), *r[3:]), strict=True)) for r in rows]

    def records(
        self, experiment: str, kind: str | None = None, status: str | None = "done"
    ) -> list[dict[str, Any]]:
        """Every record of an experiment, as flat rows ready for :func:`aggregate`.

        Each row is the record's data plus ``run_id``, ``kind`` and ``step``, plus the run's
        configuration fields under their own names where the data has no such key (nested
        configurations as dotted keys, ``train.epochs``). ``kind``
        filters on the kind; ``status`` keeps the runs with that status (None: any status).
        Ordered by run start, run id, kind and step.
        """
        _check_status(status)
        query = (
            "SELECT r.run_id, r.kind, r.step, r.data, u.config FROM records AS r "
            "JOIN runs AS u ON r.experiment = u.experiment AND r.run_id = u.run_id "
            "WHERE r.experiment = ?"
        )
        params: list[Any] = [experiment]
        if kind is not None:
            query += " AND r.kind = ?"
            params.append(kind)
        if status is not None:
            query += " AND u.status = ?"
            params.append(status)
        query += " ORDER BY u.started, r.run_id, r.kind, r.step"
        with self._db() as db:
            rows = db.execute(query, params).fetchall()
        configs: dict[str, dict[str, Any]] = {}
        out = []
        for run_id, kind_, step, data, config in rows:
            row = {"run_id": run_id, "kind": kind_, "step": step, **json.loads(data)}
            if run_id not in configs:
                configs[run_id] = flatten(json.loads(config))
            for key, value in configs[run_id].items():
                row.setdefault(key, value)
            out.append(row)
        return out

    def experiments(self) -> list[str]:
        """The names of the experiments with at least one run, sorted."""
        with self._db() as db:
            rows = db.execute("SELECT DISTINCT experiment FROM runs ORDER BY experiment")
            return [r[0] for r in rows.fetchall()]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A configuration dict with nested configurations as dotted keys (``train.epochs``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_run_seed(train: Any) -> None:
    """An experiment's nested training configuration takes the run's seed: its own must be
    left at 0 (``ValueError`` otherwise, rather than a seed silently replaced)."""
    if getattr(train, "seed", 0) != 0:
        raise ValueError("set the run's seed, not train.seed (the run's seed is the training seed)")


LOCK_TIMEOUT = 60.0
"""Seconds a store waits for another process's lock before it gives up."""


def _while_locked(action: Callable[[], Any], timeout: float = LOCK_TIMEOUT) -> Any:
    """Run ``action``, retrying with jittered back-off while SQLite says the database is
    locked or busy (up to ``timeout`` seconds; then the error is raised)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return action()
        except sqlite3.OperationalError as err:
            message = str(err)
            if ("locked" not in message and "busy" not in message) or (time.monotonic() > deadline):
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.25)


def _check_status(status: str | None) -> None:
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")


def _dumps(value: Any, indent: int | None = None) -> str:
    """Strict JSON (no NaN), compact unless indented; keys in their own order."""
    return dumps(value, indent=indent, sort_keys=False)


class Run:
    """One run of an experiment, as returned by :meth:`RunStore.begin`.

    ``config`` is the configuration the run function reads; ``dir`` its directory. Records
    (:meth:`record`) go to the database; files (:meth:`save_json`, :meth:`save_tensors`, or any
    writer given :meth:`path`) go to the directory, atomically.

    To resume inside a run, write a step's files first and record the step last: the record is
    the commit point, and :meth:`completed` lists the steps already committed.
    """

    def __init__(self, store: RunStore, experiment: str, run_id: str, config: Any, dir: Path):
        self.store = store
        self.experiment = experiment
        self.run_id = run_id
        self.config = config
        self.dir = dir

    def __repr__(self) -> str:
        return f"Run({self.experiment!r}, {self.run_id!r})"

    def record(self, kind: str, step: int, data: Mapping[str, Any]) -> None:
        """Store ``data`` as the record ``(kind, step)`` of this run, replacing any earlier one.

        Values must be JSON-able; numpy and torch scalars (and small arrays) are converted to
        Python numbers, and NaN or infinite floats are stored as null. The keys ``run_id``,
        ``kind`` and ``step`` are reserved.
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"a record kind is a non-empty string, not {kind!r}")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"a record step is an integer, not {type(step).__name__}")
        clash = RESERVED_KEYS.intersection(data)
        if clash:
            raise ValueError(f"record keys {sorted(clash)} are reserved")
        text = _dumps(_jsonable(data, f"record {kind!r} step {step}"))
        with self.store._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO records (experiment, run_id, kind, step, data) "
                "VALUES (?, ?, ?, ?, ?)",
                (self.experiment, self.run_id, kind, int(step), text),
            )

    def completed(self, kind: str) -> dict[int, dict[str, Any]]:
        """The records of ``kind`` already stored for this run, by step (for resuming)."""
        with self.store._db() as db:
            rows = db.execute(
                "SELECT step, data FROM records WHERE experiment = ? AND run_id = ? AND kind = ? "
                "ORDER BY step",
                (self.experiment, self.run_id, kind),
            ).fetchall()
        return {step: json.loads(data) for step, data in rows}

    def link(self, parent: Run) -> None:
        """Record that this run branches from (or builds on) ``parent``."""
        with self.store._db() as db:
            db.execute(
                "UPDATE runs SET parent = ? WHERE experiment = ? AND run_id = ?",
                (f"{parent.experiment}/{parent.run_id}", self.experiment, self.run_id),
            )

    def finish(self) -> None:
        """Mark the run 'done'."""
        self.store._set_status(self.experiment, self.run_id, "done", None)

    def fail(self, error: str) -> None:
        """Mark the run 'failed' with an error message."""
        self.store._set_status(self.experiment, self.run_id, "failed", error)

    def interrupted(self) -> None:
        """Mark the run 'interrupted' (stopped by the user; a rerun resumes it)."""
        self.store._set_status(self.experiment, self.run_id, "interrupted", None)

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
        :func:`save_tensors`; :func:`tensor_metadata` reads ``metadata`` back)."""
        return save_tensors(self.path(name), tensors, metadata)

    def load_tensors(self, name: str) -> dict[str, Tensor]:
        """Read a tensor file of this run, verifying its checksum (see :func:`load_tensors`)."""
        return load_tensors(self.path(name))
