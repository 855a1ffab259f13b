"""Stored results stay trustworthy: concurrent starts, configuration-aware reports, damaged
databases, verified resumption, checksums over header fields, bounded allocation, damaged
files reported as damaged, temporary files that never follow links, and the small ones.

One test (or more) per item of the reliability issue; each failed on winnow 0.1. The helpers
build configurations for either configuration layout, so the scenarios replay on 0.1 too.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pickle
import shutil
import sqlite3
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import winnow
import winnow.cli
from winnow import Masks, TrainConfig
from winnow.experiments import RunStore, at_init, lottery

LOTTERY = {"model": "mlp", "data": "synthetic", "rounds": 2, "rate": 0.5, "data_limit": 200}


def _nested(cls) -> bool:
    return "train" in {f.name for f in dataclasses.fields(cls)}


def lottery_sweep(iterations: int, seeds=(0,), controls=("none",), **fields):
    fields = {**LOTTERY, **fields}
    schedule = {"iterations": iterations, "eval_every": 8, "batch_size": 32}
    if _nested(lottery.LotteryConfig):
        return lottery.sweep(seeds=seeds, controls=controls, train=TrainConfig(**schedule),
                             **fields)  # fmt: skip
    return lottery.sweep(seeds=seeds, controls=controls, **schedule, **fields)


def at_init_sweep(epochs: float, **fields):
    options = dict(model="mlp", data="synthetic", methods=("magnitude",), densities=(0.2,),
                   seeds=(0,), controls=("none",), data_limit=120)  # fmt: skip
    options.update(fields)
    if _nested(at_init.AtInitConfig):
        return at_init.sweep(train=TrainConfig(epochs=epochs), **options)
    return at_init.sweep(epochs=epochs, **options)


# -- 1. several processes creating one results directory ----------------------------------------
def _open_store(root: str, barrier, results) -> None:
    barrier.wait()
    try:
        RunStore(root).runs("x")
        results.put("ok")
    except Exception as err:  # noqa: BLE001 (what failed is the result)
        results.put(f"{type(err).__name__}: {err}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to start processes at once")
def test_eight_processes_create_one_store_at_once(tmp_path):
    context = multiprocessing.get_context("fork")
    outcomes = []
    for trial in range(8):
        barrier, results = context.Barrier(8), context.Queue()
        workers = [
            context.Process(target=_open_store, args=(str(tmp_path / str(trial)), barrier, results))
            for _ in range(8)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        outcomes += [results.get(timeout=10) for _ in workers]
    assert outcomes == ["ok"] * 64, sorted(set(outcomes))


# -- 2. reports group by the whole configuration ---------------------------------------------
def test_lottery_report_keeps_configurations_apart(tmp_path):
    lottery.run(tmp_path, lottery_sweep(16) + lottery_sweep(32), progress=False)
    paths = lottery.report(tmp_path)
    table = paths["table"].read_text()
    rows = [line for line in table.splitlines() if "| ticket |" in line]
    assert len(rows) == 2 * 3  # two configurations x rounds 0..2, one seed each
    assert all(line.rstrip().endswith("| 1 |") for line in rows), table  # n = 1, not 2
    assert "iterations" in table.splitlines()[0]  # the table says which field differs
    overlap = paths["overlap"].read_text()
    assert "| 2 |" not in overlap.split("\n", 2)[2].replace("| 2 | ", "")  # never "seeds 2"
    assert all(row["seeds"] == 1 for row in lottery.mask_overlaps(RunStore(tmp_path)))


def test_at_init_report_keeps_epochs_apart(tmp_path):
    at_init.run(tmp_path, at_init_sweep(0.5) + at_init_sweep(2.0), progress=False)
    table = at_init.report(tmp_path)["table"].read_text()
    dense = [line for line in table.splitlines() if "| dense |" in line]
    assert len(dense) == 2 and all(line.rstrip().endswith("| 1 |") for line in dense), table


# -- 3. a damaged database -------------------------------------------------------------------------
@pytest.fixture
def finished_store(tmp_path):
    root = tmp_path / "results"
    at_init.run(root, at_init_sweep(1.0), progress=False)
    RunStore(root).close()
    with sqlite3.connect(root / "winnow.sqlite") as db:  # merge the WAL into the file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return root


@pytest.mark.parametrize("damage", ["truncated", "garbled page"])
def test_a_damaged_database_is_one_line_and_exit_2(finished_store, damage, capsys):
    database = finished_store / "winnow.sqlite"
    raw = bytearray(database.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 3]
    else:
        raw[4096 : 4096 + 512] = os.urandom(512)
    database.write_bytes(bytes(raw))
    for name in ("winnow.sqlite-wal", "winnow.sqlite-shm"):
        (finished_store / name).unlink(missing_ok=True)
    code = winnow.cli.main(["experiment", "report", "at-init", "--results", str(finished_store)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "winnow.sqlite" in err, err


def test_a_flipped_bit_in_a_record_is_caught_and_repaired(finished_store):
    database = finished_store / "winnow.sqlite"
    store = RunStore(finished_store)
    (dense,) = [r for r in store.records("at-init", kind="result") if r["method"] == "dense"]
    store.close()
    raw = bytearray(database.read_bytes())
    text = json.dumps(dense["test_acc"]).encode()
    at = raw.index(b'"test_acc":' + text)
    digit = at + len(b'"test_acc":') + 3  # a digit of the accuracy
    raw[digit] = ord("1") if raw[digit] != ord("1") else ord("2")
    database.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        RunStore(finished_store).records("at-init", kind="result")
    from winnow.experiments import check_store, repair_store

    assert any("checksum" in problem for problem in check_store(finished_store))
    repair_store(finished_store)
    assert check_store(finished_store) == []
    repaired = RunStore(finished_store).records("at-init", kind="result")
    assert [r["test_acc"] for r in repaired if r["method"] == "dense"] == [dense["test_acc"]]


# -- 4. resumption checks the files it resumes from ------------------------------------------------
def _ticket_dir(root: Path) -> Path:
    (run,) = [r for r in RunStore(root).runs("lottery") if r["config"]["control"] == "none"]
    return root / "lottery" / run["run_id"]


def _half_finished_ticket(root: Path, configs) -> None:
    """A ticket stopped after round 1 (its record and masks-2 written, round 2 not)."""
    original = lottery.iterative_magnitude_pruning

    def two_rounds(*args, **kwargs):
        for r in original(*args, **kwargs):
            yield r
            if r.round == 1:
                raise KeyboardInterrupt

    lottery.iterative_magnitude_pruning = two_rounds
    try:
        with pytest.raises(KeyboardInterrupt):
            lottery.run(root, configs, progress=False)
    finally:
        lottery.iterative_magnitude_pruning = original


def test_a_replaced_mask_file_is_recomputed_not_trusted(tmp_path):
    configs = lottery_sweep(16)
    lottery.run(tmp_path / "clean", configs, progress=False)
    damaged = tmp_path / "damaged"
    _half_finished_ticket(damaged, configs)
    ticket = _ticket_dir(damaged)
    shutil.copy(ticket / "masks-0.safetensors", ticket / "masks-2.safetensors")  # valid, wrong
    lottery.run(damaged, configs, progress=False)
    rounds = {r["step"]: r for r in RunStore(damaged).records("lottery", kind="round")}
    clean = {r["step"]: r for r in RunStore(tmp_path / "clean").records("lottery", kind="round")}
    assert rounds[2]["density"] == pytest.approx(clean[2]["density"]) != 1.0
    assert Masks.load(ticket / "masks-3.safetensors") == Masks.load(
        _ticket_dir(tmp_path / "clean") / "masks-3.safetensors"
    )


@pytest.mark.parametrize("name", ["rewind.safetensors", "masks-2.safetensors"])
def test_a_corrupted_file_is_recomputed_instead_of_failing_forever(tmp_path, name):
    configs = lottery_sweep(16)
    _half_finished_ticket(tmp_path, configs)
    path = _ticket_dir(tmp_path) / name
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # a flipped bit in the tensor data: the file no longer loads
    path.write_bytes(bytes(raw))
    lottery.run(tmp_path, configs, progress=False)
    (run,) = RunStore(tmp_path).runs("lottery")
    assert run["status"] == "done", run["error"]


# -- 5. checksums cover the header fields --------------------------------------------------------
def _edit_header(path: Path, change) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    arrays = load_file(str(path))
    header = json.loads(metadata["winnow"])
    change(header)
    save_file(arrays, str(path), metadata={**metadata, "winnow": json.dumps(header)})


def test_a_mask_shape_edit_is_detected(tmp_path):
    path = tmp_path / "m.safetensors"
    Masks({"w": torch.ones(4, 10, dtype=torch.bool)}).save(path)
    table = "entries" if "entries" in path.read_bytes().decode("latin1") else "masks"
    _edit_header(path, lambda h: h[table]["w"].update(shape=[4, 9]))
    with pytest.raises(ValueError):
        Masks.load(path)


def test_a_sparse_tensor_reshape_is_detected(tmp_path):
    path = tmp_path / "s.sparse"
    winnow.save_sparse({"w": torch.randn(8, 16)}, path)
    table = "entries" if b'\\"entries\\"' in path.read_bytes() else "tensors"
    _edit_header(path, lambda h: h[table]["w"].update(shape=[16, 8]))
    with pytest.raises(ValueError):
        winnow.load_sparse(path)


# -- 6. sizes are bounded before anything large is allocated -------------------------------------
def _sparse_file(path: Path, tensors: int, numel: int) -> None:
    """A valid sparse checkpoint of all-zero COO float32 tensors of ``numel`` elements."""
    winnow.save_sparse({f"t{i}": torch.zeros(8) for i in range(tensors)}, path, format="coo")
    table = "entries" if b'\\"entries\\"' in path.read_bytes() else "tensors"

    def claim(header):
        for entry in header[table].values():
            entry["shape"] = [numel]
            if "decoded_sha256" in entry:
                entry["decoded_sha256"] = "0" * 64
            else:
                entry["sha256"] = "0" * 64
        if "sha256" in header:  # version 2: sign the crafted header, as an attacker could
            from winnow.io.container import _entry_digest, _header_digest

            for entry in header[table].values():
                entry["sha256"] = _entry_digest(entry, {})
            header["sha256"] = _header_digest(header)

    _edit_header(path, claim)


def test_a_tiny_sparse_file_cannot_claim_memory(tmp_path):
    path = tmp_path / "huge.sparse"
    _sparse_file(path, tensors=128, numel=1 << 28)  # 128 x 1 GiB of zeros, each under 16 GiB
    assert path.stat().st_size < 64 << 10
    tracemalloc.start()
    try:  # refused by default (at most 64 GiB, and half of this machine's memory, in all)
        with pytest.raises(ValueError, match="bytes"):
            winnow.load_sparse(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_a_spec_larger_than_its_file_is_refused_before_building(tmp_path):
    from winnow import structured
    from winnow.experiments import save_tensors

    spec = {"format": structured.SPEC_FORMAT, "sequential": [
        {"name": "0", "type": "Linear",
         "args": {"in_features": 16384, "out_features": 16384, "bias": True}}
    ]}  # fmt: skip
    path = tmp_path / "spec.safetensors"
    save_tensors(path, {"0.weight": torch.zeros(2, 2)}, metadata={"spec": spec})
    before = _max_rss()
    with pytest.raises(ValueError, match="does not hold|spec"):
        structured.load(path)
    assert _max_rss() - before < 256 << 20  # a Linear(16384, 16384) is 1 GiB


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_a_cifar_pickle_cannot_allocate_from_nothing(tmp_path):
    class Huge:
        def __reduce__(self):  # numpy.ndarray(shape): uninitialised memory of that shape
            return (np.ndarray, ((1 << 18, 3072), "u1"))

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    payload = pickle.dumps({b"data": Huge(), b"labels": [0] * (1 << 18)}, protocol=4)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(payload)
    before = _max_rss()
    with pytest.raises(ValueError, match="refused|not a readable CIFAR-10 batch"):
        winnow.data.load("cifar10", root=tmp_path)  # refused while unpickling, nothing built
    assert _max_rss() - before < 256 << 20


# -- 7. a damaged sparse checkpoint is reported as damaged ---------------------------------------
def test_a_damaged_checkpoint_is_not_taken_for_a_state_dict(tmp_path, capsys):
    path = tmp_path / "model.sparse"
    winnow.save_sparse({"w": torch.randn(6, 6)}, path)
    raw = bytearray(path.read_bytes())
    colon = raw.index(b":", raw.index(b'\\"order\\"'))
    raw[colon] = ord(";")  # one byte of invalid JSON inside winnow's metadata (the file stays
    path.write_bytes(bytes(raw))  # valid safetensors)
    assert winnow.cli.main(["inspect", str(path)]) == 2
    assert "damaged" in capsys.readouterr().err
    assert winnow.cli.main(["pack", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# -- 8. temporary files never follow a planted link ----------------------------------------------
def test_a_planted_link_at_the_temporary_name_redirects_nothing(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "masks.safetensors"
    os.symlink(victim, tmp_path / f".{target.name}.tmp-{os.getpid()}")  # 0.1's temporary name
    Masks({"w": torch.ones(3, dtype=torch.bool)}).save(target)
    assert victim.read_bytes() == b"precious"
    assert Masks.load(target)["w"].all()


# -- 9. the smaller ones -----------------------------------------------------------------------
def test_deep_json_is_an_error_not_a_recursion_error(tmp_path):
    from winnow.formats import SparseFileError, is_sparse_checkpoint

    path = tmp_path / "deep.sparse"
    deep = "[" * 200_000 + "]" * 200_000
    text = '{"format": "winnow.sparse", "version": 1, "order": [], "tensors": {}, "m": ' + deep
    save_file({"x": torch.zeros(1)}, str(path), metadata={"winnow": text + "}"})
    assert is_sparse_checkpoint(path) in (True, False)  # answers, does not crash
    with pytest.raises(SparseFileError):
        winnow.load_sparse(path)
    with pytest.raises(ValueError):
        Masks.load(path)


def test_files_are_byte_reproducible(tmp_path):
    from winnow.experiments import save_tensors

    state = {"b": torch.randn(3, 4), "a": torch.arange(5.0)}
    for i in range(2):
        winnow.save_sparse(state, tmp_path / f"{i}.sparse", metadata={"k": 1, "j": [1, 2]})
        save_tensors(tmp_path / f"{i}.tensors", state, {"z": 1, "a": {"y": 2, "x": 3}})
    assert (tmp_path / "0.sparse").read_bytes() == (tmp_path / "1.sparse").read_bytes()
    assert (tmp_path / "0.tensors").read_bytes() == (tmp_path / "1.tensors").read_bytes()


def test_a_flipped_count_in_the_header_is_caught_by_inspect(tmp_path, capsys):
    path = tmp_path / "model.sparse"
    weight = torch.randn(10, 10)
    weight[weight.abs() < 1] = 0
    winnow.save_sparse({"w": weight}, path, format="csr")
    nnz = int(weight.count_nonzero())
    raw = bytearray(path.read_bytes())
    field = f'\\"nnz\\":{nnz}'.encode()
    if field not in raw:
        field = f'\\"nnz\\": {nnz}'.encode()
    at = raw.index(field) + len(field) - 1
    raw[at] ^= 1  # one bit of the count
    path.write_bytes(bytes(raw))
    assert winnow.cli.main(["inspect", str(path)]) == 2
    assert "checksum" in capsys.readouterr().err


def test_an_empty_training_set_is_an_error():
    data = winnow.data.load("synthetic", n_train=64, n_test=16)
    empty = dataclasses.replace(data, x_train=data.x_train[:0], y_train=data.y_train[:0])
    model = winnow.models.create("mlp", 4, 1, 8)
    with pytest.raises(ValueError, match="empty"):
        winnow.train(model, empty, TrainConfig(epochs=1))


def test_check_and_repair_from_the_command_line(finished_store, capsys):
    database = finished_store / "winnow.sqlite"
    raw = bytearray(database.read_bytes())
    at = raw.index(b'"test_acc":')
    raw[at + len(b'"test_acc":') + 3] ^= 0x01  # one bit of a stored accuracy
    database.write_bytes(bytes(raw))
    results = ["--results", str(finished_store)]
    assert winnow.cli.main(["experiment", "check", *results]) == 2
    assert "checksum" in capsys.readouterr().out
    assert winnow.cli.main(["experiment", "repair", *results]) == 0
    assert winnow.cli.main(["experiment", "check", *results]) == 0
    assert winnow.cli.main(["experiment", "report", "at-init", *results]) == 0
