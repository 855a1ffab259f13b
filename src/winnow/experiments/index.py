"""The run store's SQLite index: statuses and records of every run, each row checksummed.

The index is a cache: the files of each run (``config.json``, ``status.json`` and
``records/<kind>/<step>.json``, written before their row) are the source of truth, and
:func:`rebuild` makes a new index from them. The database is in WAL mode and every write is one
autocommitted statement (or one short transaction), so several processes can write at once.

A third table holds the *leases*: which process (an owner id) executes a run, until when. A
run is claimed in one transaction (:func:`claim`: take the lease if there is none or it has
expired, unless the run is done), its holder renews it while the run executes (:func:`renew`),
and a holder that dies loses it when it expires. Leases are not rebuilt by :func:`rebuild`
(nothing may use a store while it is repaired).

Every row carries a SHA-256 of its content (a record's: experiment, run, kind, step, data and
file digests; a run's: experiment, run, configuration, status, error and parent; a lease's:
experiment, run, owner and expiry), checked on
every read: a flipped bit in a stored accuracy is reported, not reported on. Anything SQLite
says is damaged (a truncated file, a garbled page) becomes one :class:`StoreError` naming the
database and the commands that check and repair it. Rows written by winnow 0.1 have no checksum
and are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from winnow.io import dumps

LOCK_TIMEOUT = 60.0
"""Seconds a store waits for another process's lock before it gives up."""

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
    checksum TEXT,
    PRIMARY KEY (experiment, run_id)
);
CREATE TABLE IF NOT EXISTS records (
    experiment TEXT NOT NULL,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    data TEXT NOT NULL,
    files TEXT,
    checksum TEXT,
    PRIMARY KEY (experiment, run_id, kind, step)
);
CREATE TABLE IF NOT EXISTS leases (
    experiment TEXT NOT NULL,
    run_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    expires REAL NOT NULL,
    checksum TEXT,
    PRIMARY KEY (experiment, run_id)
);
"""
_ADDED_COLUMNS = {"runs": ("parent", "checksum"), "records": ("files", "checksum")}
"""Columns winnow 0.1's index lacks, added when it is opened."""


class StoreError(ValueError):
    """A run store's index is damaged, or one of its rows fails its checksum."""


RUN_COLUMNS = "experiment, run_id, config, status, error, parent, started, finished, checksum"
"""The columns of a runs row, in the order :meth:`Index.verified_run` reads them."""


def run_checksum(experiment, run_id, config, status, error, parent, started, finished) -> str:
    """SHA-256 of what a run's row says."""
    text = json.dumps([experiment, run_id, config, status, error, parent, started, finished])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record_checksum(experiment, run_id, kind, step, data, files) -> str:
    """SHA-256 of what a record's row says."""
    text = json.dumps([experiment, run_id, kind, int(step), data, files])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def lease_checksum(experiment, run_id, owner, expires) -> str:
    """SHA-256 of what a lease's row says."""
    text = json.dumps([experiment, run_id, owner, float(expires)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def while_locked(action: Callable[[], Any], timeout: float = LOCK_TIMEOUT) -> Any:
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


class Index:
    """One process's connection to ``database`` (opened on first use, reopened after a
    fork), with every SQLite error on damage turned into a :class:`StoreError`."""

    def __init__(self, database: Path, root: Path) -> None:
        self.database, self.root = database, root
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        with self.connection() as db:
            result = while_locked(lambda: db.execute("PRAGMA quick_check").fetchall())
            if result != [("ok",)]:
                raise self.damaged(f"SQLite's quick check: {result[0][0]}")
            while_locked(lambda: _create_schema(db))

    def damaged(self, err: Exception) -> StoreError:
        return StoreError(
            f"{self.database}: damaged run store ({err}); `winnow experiment check --results "
            f"{self.root}` says what is wrong, `winnow experiment repair --results {self.root}` "
            "rebuilds it from the run directories"
        )

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                if self._conn is None or self._pid != os.getpid():
                    self._conn, self._pid = _connect(self.database), os.getpid()
                yield self._conn
            except (sqlite3.DatabaseError, UnicodeDecodeError) as err:
                if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                    raise
                raise self.damaged(err) from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def verified_run(self, row: tuple) -> tuple:
        """A runs row (the columns of :data:`RUN_COLUMNS`) after its checksum is checked."""
        experiment, run_id, config, status, error, parent, started, finished, checksum = row
        try:
            expected = run_checksum(
                experiment, run_id, config, status, error, parent, started, finished
            )
        except (TypeError, ValueError):
            expected = None
        if (checksum is not None or expected is None) and checksum != expected:
            raise StoreError(
                f"{self.database}: run {experiment}/{run_id} fails its checksum (damaged); "
                f"`winnow experiment repair --results {self.root}` rebuilds the index"
            )
        return row

    def verified_record(self, row: tuple) -> tuple:
        """A records row ``(experiment, run_id, kind, step, data, files, checksum, ...)``
        after its checksum is checked."""
        experiment, run_id, kind, step, data, files, checksum = row[:7]
        try:
            expected = record_checksum(experiment, run_id, kind, step, data, files)
        except (TypeError, ValueError):  # a garbled row: no step, say
            expected = None
        if (checksum is not None or expected is None) and checksum != expected:
            raise StoreError(
                f"{self.database}: record {kind!r} step {step} of run {experiment}/{run_id} "
                f"fails its checksum (damaged); `winnow experiment repair --results "
                f"{self.root}` rebuilds the index"
            )
        return row

    def verified_lease(self, row: tuple) -> tuple:
        """A leases row ``(experiment, run_id, owner, expires, checksum)`` after its checksum
        is checked."""
        experiment, run_id, owner, expires, checksum = row
        try:
            expected = lease_checksum(experiment, run_id, owner, expires)
        except (TypeError, ValueError):
            expected = None
        if checksum != expected:
            raise StoreError(
                f"{self.database}: the lease of run {experiment}/{run_id} fails its checksum "
                f"(damaged); `winnow experiment repair --results {self.root}` rebuilds the index"
            )
        return row


def _connect(database: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        database, timeout=LOCK_TIMEOUT, isolation_level=None, check_same_thread=False
    )
    # switching a new database to WAL takes an exclusive lock that SQLite does not wait for
    # (several processes opening one fresh store got "database is locked" at once)
    while_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _create_schema(db: sqlite3.Connection) -> None:
    db.executescript(_SCHEMA)
    for table, added in _ADDED_COLUMNS.items():
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for column in added:
            if column in columns:
                continue
            try:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
            except sqlite3.OperationalError as err:  # another process added it first
                if "duplicate column" not in str(err):
                    raise


def write_run(db, experiment, run_id, config, status, started, finished, error, parent) -> None:
    """Insert or replace a run's row, with its checksum."""
    checksum = run_checksum(experiment, run_id, config, status, error, parent, started, finished)
    db.execute(
        "INSERT OR REPLACE INTO runs (experiment, run_id, config, status, started, finished, "
        "error, parent, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (experiment, run_id, config, status, started, finished, error, parent, checksum),
    )


def write_record(db, experiment, run_id, kind, step, data, files) -> None:
    """Insert or replace a record's row, with its checksum."""
    checksum = record_checksum(experiment, run_id, kind, step, data, files)
    db.execute(
        "INSERT OR REPLACE INTO records (experiment, run_id, kind, step, data, files, checksum) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (experiment, run_id, kind, int(step), data, files, checksum),
    )


# -- leases: which process executes a run, until when --------------------------------------------
LEASE_COLUMNS = "experiment, run_id, owner, expires, checksum"


def claim(
    index: Index,
    experiment: str,
    run_id: str,
    owner: str,
    expires: float,
    redo: bool = False,
    gone: Callable[[str], bool] | None = None,
) -> tuple[str, str | None, float | None]:
    """Claim run ``experiment/run_id`` for ``owner`` until ``expires`` (Unix time), in one
    transaction: ``("done", None, None)`` if the run is done (unless ``redo``: a finished run
    whose files are to be recomputed), ``("held", holder, until)`` while another owner's lease
    has not expired (and ``gone(holder)`` is not true), else the lease is written (inserted,
    taken over from an expired or gone holder, or renewed for the same owner) and
    ``("claimed", owner, expires)`` returned."""

    def attempt() -> tuple[str, str | None, float | None]:
        with index.connection() as db:
            db.execute("BEGIN IMMEDIATE")  # the write lock first: claims are serialised
            try:
                if not redo:
                    row = db.execute(
                        f"SELECT {RUN_COLUMNS} FROM runs WHERE experiment = ? AND run_id = ?",
                        (experiment, run_id),
                    ).fetchone()
                    if row is not None and index.verified_run(row)[3] == "done":
                        db.execute("COMMIT")
                        return ("done", None, None)
                row = db.execute(
                    f"SELECT {LEASE_COLUMNS} FROM leases WHERE experiment = ? AND run_id = ?",
                    (experiment, run_id),
                ).fetchone()
                if row is not None:
                    _, _, holder, until, _ = index.verified_lease(row)
                    live = until > time.time() and not (gone is not None and gone(holder))
                    if holder != owner and live:
                        db.execute("COMMIT")
                        return ("held", holder, until)
                _write_lease(db, experiment, run_id, owner, expires)
                db.execute("COMMIT")
                return ("claimed", owner, expires)
            except BaseException:
                db.execute("ROLLBACK")
                raise

    return while_locked(attempt)


def renew(index: Index, experiment: str, run_id: str, owner: str, expires: float) -> bool:
    """Move ``owner``'s lease on the run to ``expires``; False if it no longer holds it (it
    expired and another owner took it over)."""

    def attempt() -> bool:
        with index.connection() as db:
            cursor = db.execute(
                "UPDATE leases SET expires = ?, checksum = ? "
                "WHERE experiment = ? AND run_id = ? AND owner = ?",
                (float(expires), lease_checksum(experiment, run_id, owner, expires),
                 experiment, run_id, owner),
            )  # fmt: skip
            return cursor.rowcount == 1

    return while_locked(attempt)


def release(index: Index, experiment: str, run_id: str, owner: str) -> None:
    """Drop ``owner``'s lease on the run (nothing if it no longer holds it)."""

    def attempt() -> None:
        with index.connection() as db:
            db.execute(
                "DELETE FROM leases WHERE experiment = ? AND run_id = ? AND owner = ?",
                (experiment, run_id, owner),
            )

    while_locked(attempt)


def lease_of(index: Index, experiment: str, run_id: str) -> tuple[str, float] | None:
    """``(owner, expires)`` of the run's lease, or None if it has none (expired or not)."""
    with index.connection() as db:
        row = db.execute(
            f"SELECT {LEASE_COLUMNS} FROM leases WHERE experiment = ? AND run_id = ?",
            (experiment, run_id),
        ).fetchone()
    if row is None:
        return None
    _, _, owner, expires, _ = index.verified_lease(row)
    return owner, expires


def _write_lease(db, experiment, run_id, owner, expires) -> None:
    db.execute(
        "INSERT OR REPLACE INTO leases (experiment, run_id, owner, expires, checksum) "
        "VALUES (?, ?, ?, ?, ?)",
        (experiment, run_id, owner, float(expires),
         lease_checksum(experiment, run_id, owner, expires)),
    )  # fmt: skip


# -- the files the index is rebuilt from ---------------------------------------------------------
def read_run_files(directory: Path) -> dict[str, Any] | None:
    """What a run's directory says of it (``config.json``, ``status.json``, the record files),
    or None if it holds no readable ``config.json``."""
    try:
        document = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        config = document["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        status = json.loads((directory / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        status = {"status": "interrupted"}  # winnow 0.1 kept statuses in the index only
    records = []
    for path in sorted((directory / "records").glob("*/*.json")):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            records.append((path.parent.name, int(path.stem), entry["data"], entry.get("files")))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged record file: that step is redone
    return {
        "experiment": document.get("experiment", directory.parent.name),
        "run_id": document.get("run_id", directory.name),
        "config": config,
        "parent": document.get("parent"),
        "status": status,
        "records": records,
    }


def rebuild(root: Path, database: Path) -> dict[str, int]:
    """Write a new index of every run directory under ``root`` to ``database`` (replacing it
    atomically); returns how many runs and records it holds."""
    tmp = database.with_name(f".{database.name}.rebuild-{os.getpid()}")
    for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        leftover.unlink(missing_ok=True)
    db = sqlite3.connect(tmp, isolation_level=None)
    runs = records = 0
    try:
        db.executescript(_SCHEMA)
        db.execute("BEGIN")
        for config_file in sorted(root.glob("*/*/config.json")):
            found = read_run_files(config_file.parent)
            if found is None:
                continue
            status = found["status"]
            experiment, run_id = found["experiment"], found["run_id"]
            write_run(
                db, experiment, run_id, dumps(found["config"], sort_keys=False),
                status.get("status", "interrupted"), status.get("started"),
                status.get("finished"), status.get("error"), found["parent"],
            )  # fmt: skip
            runs += 1
            for kind, step, data, files in found["records"]:
                write_record(
                    db, experiment, run_id, kind, step, dumps(data, sort_keys=False),
                    None if files is None else dumps(files),
                )  # fmt: skip
                records += 1
        db.execute("COMMIT")
    finally:
        db.close()
    for suffix in ("-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)
    os.replace(tmp, database)
    return {"runs": runs, "records": records}


def check(database: Path, root: Path) -> list[str]:
    """What is wrong with the index at ``database`` (empty if nothing): SQLite's integrity
    check, every row's checksum, and runs the index and the run directories disagree on."""
    problems: list[str] = []
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            result = db.execute("PRAGMA integrity_check").fetchall()
            if result != [("ok",)]:
                problems += [f"integrity: {r[0]}" for r in result[:10]]
            index = Index.__new__(Index)
            index.database, index.root = database, root
            rows = db.execute(f"SELECT {RUN_COLUMNS} FROM runs").fetchall()
            known = set()
            for row in rows:
                known.add((row[0], row[1]))
                try:
                    index.verified_run(row)
                except StoreError as err:
                    problems.append(str(err))
            for row in db.execute(
                "SELECT experiment, run_id, kind, step, data, files, checksum FROM records"
            ):
                try:
                    index.verified_record(row)
                except StoreError as err:
                    problems.append(str(err))
            has_leases = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'leases'"
            ).fetchone()
            for row in db.execute(f"SELECT {LEASE_COLUMNS} FROM leases") if has_leases else ():
                try:
                    index.verified_lease(row)
                except StoreError as err:
                    problems.append(str(err))
        finally:
            db.close()
    except sqlite3.DatabaseError as err:
        return [f"{database}: not readable as a SQLite database ({err})"]
    on_disk = {(p.parent.parent.name, p.parent.name) for p in root.glob("*/*/config.json")}
    for experiment, run_id in sorted(on_disk - known):
        problems.append(f"run {experiment}/{run_id} has a directory but no row in the index")
    for experiment, run_id in sorted(known - on_disk):
        problems.append(f"run {experiment}/{run_id} is in the index but has no directory")
    return problems
