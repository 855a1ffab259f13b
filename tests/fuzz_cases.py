"""Mutation fuzzing of winnow's files: mask files, sparse checkpoints, tensor files and the run
store's database.

Each case takes a valid file, mutates its bytes (bit flips, overwritten or zeroed ranges,
truncation, inserted, deleted or duplicated bytes) with a seeded generator, and reads it back
with winnow's own reader. The outcome is one of:

- ``error``: a winnow error (a ``ValueError`` subclass naming the file: ``WinnowFileError``,
  ``StoreError``) or ``FileNotFoundError``;
- ``identical``: it read back exactly what was written (the bytes changed were padding, an
  unused page, or a field the reader ignores);
- ``other``: anything else, a crash with another exception or, worse, different content read
  without an error. No case may end there.

``test_fuzz.py`` runs a bounded, seeded number of cases per kind in CI (``--fuzz-count`` for
more); ``bench/reliability.py`` runs ten thousand and more, with the memory each case took.
"""

from __future__ import annotations

import resource
import shutil
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

KINDS = ("masks", "sparse", "tensors", "database")


def _masks_file(directory: Path) -> tuple[Path, Callable[[Path], Any]]:
    from winnow import Masks

    gen = torch.Generator().manual_seed(0)
    masks = Masks(
        {
            "a.weight": torch.rand(12, 20, generator=gen) < 0.3,
            "b.weight": torch.rand(5, 3, 3, generator=gen) < 0.6,
            "c.weight": torch.rand(7, generator=gen) < 0.5,
        }
    )
    path = directory / "masks.safetensors"
    masks.save(path)
    return path, lambda p: {k: v.clone() for k, v in Masks.load(p).items()}


def _sparse_file(directory: Path) -> tuple[Path, Callable[[Path], Any]]:
    import winnow

    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(16, 24, generator=gen)
    state = {
        "csr": dense.masked_fill(torch.rand(16, 24, generator=gen) < 0.9, 0),
        "bitmap": torch.randn(8, 8, generator=gen).masked_fill(
            torch.rand(8, 8, generator=gen) < 0.5, 0
        ),
        "entropy": torch.randn(300, generator=gen).masked_fill(
            torch.rand(300, generator=gen) < 0.95, 0
        ),
        "dense": torch.randn(3, 3, generator=gen).to(torch.bfloat16),
    }
    path = directory / "model.sparse"
    winnow.save_sparse(
        state, path, format={"csr": "csr", "bitmap": "bitmap", "entropy": "entropy"},
        compress_values=True,
    )  # fmt: skip
    return path, lambda p: winnow.load_sparse(p, max_total_bytes=1 << 30)


def _tensors_file(directory: Path) -> tuple[Path, Callable[[Path], Any]]:
    from winnow.io import load_tensors, save_tensors, tensor_metadata

    gen = torch.Generator().manual_seed(2)
    state = {
        "w": torch.randn(10, 6, generator=gen),
        "n": torch.arange(7, dtype=torch.int64),
        "h": torch.randn(4, generator=gen).to(torch.float16),
    }
    path = directory / "weights.safetensors"
    save_tensors(path, state, {"iteration": 3, "spec": {"widths": [1, 2]}})
    return path, lambda p: (load_tensors(p), tensor_metadata(p))


def _database(directory: Path) -> tuple[Path, Callable[[Path], Any]]:
    from winnow.experiments import RunStore

    root = directory / "results"
    store = RunStore(root)
    for seed in range(3):
        run = store.begin("exp", _Config(seed=seed))
        for step in range(4):
            run.record("round", step, {"acc": 0.5 + seed / 10 + step / 100, "layers": [1, 2]})
        run.finish() if seed != 1 else run.fail("boom")
    store.close()
    with sqlite3.connect(root / "winnow.sqlite") as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def read(path: Path) -> Any:
        store = RunStore(path.parent)
        try:
            records = store.records("exp", kind="round", status=None)
            runs = [(r["run_id"], r["status"], r["config"], r["error"]) for r in store.runs("exp")]
            return records, runs
        finally:
            store.close()

    return root / "winnow.sqlite", read


@dataclass(frozen=True)
class _Config:
    seed: int = 0
    method: str = "snip"


ORIGINALS = {
    "masks": _masks_file,
    "sparse": _sparse_file,
    "tensors": _tensors_file,
    "database": _database,
}


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` with one to three random mutations."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        if not out:
            break
        kind = rng.integers(0, 7)
        at = int(rng.integers(0, len(out)))
        if kind == 0:  # flip one bit
            out[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:  # overwrite a byte
            out[at] = int(rng.integers(0, 256))
        elif kind == 2:  # overwrite a short range with random bytes
            end = min(len(out), at + int(rng.integers(2, 64)))
            out[at:end] = rng.integers(0, 256, end - at, dtype=np.uint8).tobytes()
        elif kind == 3:  # zero a range
            end = min(len(out), at + int(rng.integers(1, 4096)))
            out[at:end] = bytes(end - at)
        elif kind == 4:  # truncate
            del out[at:]
        elif kind == 5:  # insert bytes
            out[at:at] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        else:  # delete bytes
            del out[at : at + int(rng.integers(1, 16))]
    return bytes(out)


def same(a: Any, b: Any) -> bool:
    """Equal, bit for bit for tensors (NaN and -0.0 included), recursively."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _start_case() -> int:
    """Reset this process's peak memory where Linux allows it (``/proc/self/clear_refs``),
    and return the memory in use now."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    now = _status_bytes("VmRSS")
    return now if now is not None else _peak()


def _peak() -> int:
    """The process's peak memory since the last reset (VmHWM), else since it started."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Outcomes:
    """What a fuzz run of one kind found."""

    kind: str
    counts: Counter = field(default_factory=Counter)
    others: list[str] = field(default_factory=list)
    peak_growth: int = 0
    """The most memory one case took above what the process held before it (peak RSS during
    the case minus RSS at its start, on Linux; elsewhere the growth of the process's peak)."""


def fuzz(kind: str, count: int, seed: int, directory: Path) -> Outcomes:
    """Run ``count`` mutation cases of ``kind`` with generator seed ``seed`` in ``directory``."""
    from winnow.experiments import StoreError
    from winnow.io import WinnowFileError

    library_errors = (WinnowFileError, StoreError, FileNotFoundError)
    original_dir = directory / "original"
    original_dir.mkdir(parents=True, exist_ok=True)
    path, read = ORIGINALS[kind](original_dir)
    expected = read(path)
    data = path.read_bytes()
    rng = np.random.default_rng(seed)
    outcomes = Outcomes(kind)
    case_dir = directory / "case"
    for case in range(count):
        mutated = mutate(data, rng)
        shutil.rmtree(case_dir, ignore_errors=True)
        shutil.copytree(original_dir, case_dir)  # the run directories too, for the database
        target = case_dir / path.relative_to(original_dir)
        for stale in target.parent.glob(target.name + "-*"):  # no -wal or -shm of the original
            stale.unlink()
        target.write_bytes(mutated)
        before = _start_case()
        try:
            got = read(target)
        except library_errors:
            outcomes.counts["error"] += 1
        except Exception as err:  # noqa: BLE001 (the point is to catch what should not happen)
            outcomes.counts["other"] += 1
            outcomes.others.append(f"case {case}: {type(err).__name__}: {err}"[:300])
        else:
            if same(got, expected):
                outcomes.counts["identical"] += 1
            else:
                outcomes.counts["other"] += 1
                outcomes.others.append(f"case {case}: read back different content, no error")
        outcomes.peak_growth = max(outcomes.peak_growth, _peak() - before)
    return outcomes
