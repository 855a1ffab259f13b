"""Experiments machinery: configuration ids, the run store, sweeps, tensor files, reports."""

import csv
import hashlib
import json
import math
import multiprocessing
import pickle
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from winnow.experiments import (
    Run,
    RunStore,
    aggregate,
    bar_plot,
    config_from_dict,
    config_id,
    config_to_dict,
    line_plot,
    markdown_table,
    run_sweep,
    tensor_metadata,
    write_table,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Train:
    iterations: int = 100
    lr: float = 0.1


@dataclass(frozen=True)
class Config:
    method: str
    density: float = 1.0
    seed: int = 0
    milestones: tuple[int, ...] = ()
    train: Train = field(default_factory=Train)


def make_config_class(extra_field: bool) -> type:
    """Two versions of one configuration class (same name); the second gains a defaulted field."""
    if extra_field:

        @dataclass(frozen=True)
        class Cfg:
            method: str
            density: float = 1.0
            seed: int = 0
            new_option: int = 7

    else:

        @dataclass(frozen=True)
        class Cfg:
            method: str
            density: float = 1.0
            seed: int = 0

    return Cfg


def temp_files(root) -> list:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


# -- configurations --------------------------------------------------------------------------
def test_config_id_follows_the_recipe_and_ignores_defaults():
    old, new = make_config_class(False), make_config_class(True)
    canonical = {"type": "Cfg", "fields": {"method": "snip", "density": 0.1}}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    expected = hashlib.sha256(text.encode()).hexdigest()[:12]
    assert config_id(old("snip", 0.1)) == expected
    assert config_id(old("snip", 0.1)) == config_id(old("snip", 0.1))
    # a new field at its default keeps the id; an explicit default counts as a default
    assert config_id(new("snip", 0.1)) == expected
    assert config_id(new("snip", 0.1, seed=0, new_option=7)) == expected
    assert config_id(new("snip", 0.1, new_option=8)) != expected


def test_config_id_differs_on_any_changed_value():
    base = Config("snip", 0.1, milestones=(10, 20))
    ids = {
        config_id(base),
        config_id(Config("grasp", 0.1, milestones=(10, 20))),
        config_id(Config("snip", 0.2, milestones=(10, 20))),
        config_id(Config("snip", 0.1, seed=1, milestones=(10, 20))),
        config_id(Config("snip", 0.1, milestones=(10, 30))),
        config_id(Config("snip", 0.1, milestones=(10, 20), train=Train(lr=0.01))),
    }
    assert len(ids) == 6
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in ids)
    assert config_id(Config("snip", 0.1, train=Train())) == config_id(Config("snip", 0.1))
    with pytest.raises(TypeError):
        config_id({"method": "snip"})


def test_config_round_trip_and_unknown_keys():
    config = Config("snip", 0.1, seed=3, milestones=(10, 20), train=Train(lr=0.01))
    data = config_to_dict(config)
    assert data == {
        "method": "snip",
        "density": 0.1,
        "seed": 3,
        "milestones": [10, 20],
        "train": {"iterations": 100, "lr": 0.01},
    }
    assert config_from_dict(Config, json.loads(json.dumps(data))) == config
    assert config_from_dict(Config, {"method": "snip"}) == Config("snip")
    with pytest.raises(ValueError, match="'colour'"):
        config_from_dict(Config, {"method": "snip", "colour": "red"})


# -- the store -------------------------------------------------------------------------------
def test_run_lifecycle_and_statuses(tmp_path):
    store = RunStore(tmp_path / "results")
    assert (tmp_path / "results" / "winnow.sqlite").is_file()
    config = Config("snip", 0.1)
    run = store.begin("pai", config)
    assert isinstance(run, Run) and run.config is config and run.run_id == config_id(config)
    assert run.dir == tmp_path / "results" / "pai" / run.run_id and run.dir.is_dir()
    saved = json.loads((run.dir / "config.json").read_text())
    assert saved["config"] == config_to_dict(config) and saved["type"] == "Config"
    assert store.status("pai", run.run_id) == "running"
    assert store.status("pai", "nope") is None
    started = store.runs("pai")[0]["started"]

    run.fail("ValueError: boom")
    (row,) = store.runs("pai")
    assert row["status"] == "failed" and row["error"] == "ValueError: boom"
    assert row["config"] == config_to_dict(config)

    again = store.begin("pai", config)  # restart keeps the start time, clears the error
    (row,) = store.runs("pai")
    assert row["status"] == "running" and row["error"] is None and row["started"] == started
    again.interrupted()
    assert store.status("pai", run.run_id) == "interrupted"
    store.begin("pai", config).finish()
    (row,) = store.runs("pai", status="done")
    assert row["finished"] >= row["started"]
    assert store.runs("pai", status="failed") == []
    store.begin("other", Config("grasp"))
    assert store.experiments() == ["other", "pai"]
    with pytest.raises(ValueError, match="status"):
        store.runs("pai", status="finished")

    clone = pickle.loads(pickle.dumps(store))  # a store can go to another process
    assert clone.status("pai", run.run_id) == "done"


def test_records_merge_config_fields(tmp_path):
    store = RunStore(tmp_path)
    done = store.begin("pai", Config("snip", 0.1, seed=1))
    done.record("eval", 0, {"acc": np.float32(0.5), "loss": float("nan"), "n": np.int64(3)})
    done.record("eval", 1, {"acc": torch.tensor(0.75), "density": 0.099})
    done.record("prune", 0, {"layers": {"fc.weight": 0.1}})
    done.finish()
    running = store.begin("pai", Config("grasp", 0.1))
    running.record("eval", 0, {"acc": 0.1})

    rows = store.records("pai", kind="eval")
    assert [(r["run_id"], r["step"]) for r in rows] == [(done.run_id, 0), (done.run_id, 1)]
    first, second = rows
    assert first == {
        "run_id": done.run_id,
        "kind": "eval",
        "step": 0,
        "acc": 0.5,
        "loss": None,
        "n": 3,
        "method": "snip",
        "density": 0.1,
        "seed": 1,
        "milestones": [],
        "train.iterations": 100,  # nested configurations as dotted keys
        "train.lr": 0.1,
    }
    assert second["acc"] == 0.75 and second["density"] == 0.099  # data wins over config
    assert len(store.records("pai")) == 3
    assert len(store.records("pai", status=None)) == 4
    assert [r["method"] for r in store.records("pai", kind="eval", status="running")] == ["grasp"]
    with pytest.raises(ValueError, match="reserved"):
        done.record("eval", 2, {"step": 2})
    with pytest.raises(TypeError):
        done.record("eval", 2, {"model": object()})


def test_completed_lists_recorded_steps(tmp_path):
    run = RunStore(tmp_path).begin("lth", Config("magnitude"))
    assert run.completed("round") == {}
    run.record("round", 0, {"acc": 0.9})
    run.record("round", 1, {"acc": 0.8})
    run.record("round", 1, {"acc": 0.85})  # an upsert replaces the step
    run.record("other", 5, {"x": 1})
    assert run.completed("round") == {0: {"acc": 0.9}, 1: {"acc": 0.85}}


def test_resume_inside_a_run(tmp_path):
    store = RunStore(tmp_path)
    executed = []

    def rounds(run: Run) -> None:
        done = run.completed("round")
        for k in range(4):
            if k in done:
                continue
            if k == 2 and not executed.count(2):
                executed.append(2)
                raise RuntimeError("killed")
            run.save_json(f"round_{k}.json", {"k": k})
            run.record("round", k, {"k": k})
            executed.append(k)

    first = run_sweep(store, "lth", [Config("magnitude")], rounds, progress=False)
    assert first.failed and executed == [0, 1, 2]
    second = run_sweep(store, "lth", [Config("magnitude")], rounds, progress=False)
    assert second.ran == 1 and executed == [0, 1, 2, 2, 3]
    assert [r["step"] for r in store.records("lth", kind="round")] == [0, 1, 2, 3]


# -- sweeps ----------------------------------------------------------------------------------
def test_failure_is_recorded_and_the_sweep_goes_on(tmp_path):
    store = RunStore(tmp_path)
    configs = [Config("bad"), Config("good")]

    def work(run: Run) -> None:
        if run.config.method == "bad":
            raise ValueError("no such\nmethod")
        run.record("final", 0, {"acc": 1.0})

    summary = run_sweep(store, "exp", configs, work, progress=False)
    bad, good = (config_id(c) for c in configs)
    assert summary.ran == 1 and summary.skipped == 0
    assert summary.failed == [(bad, "ValueError: no such method")]
    assert store.status("exp", bad) == "failed" and store.status("exp", good) == "done"
    assert store.runs("exp", status="failed")[0]["error"] == "ValueError: no such method"
    assert "no such" in (store.run_dir("exp", bad) / "traceback.txt").read_text()
    with pytest.raises(ValueError, match="no such"):
        run_sweep(store, "exp", configs, work, progress=False, stop_on_error=True)


def test_finished_runs_are_skipped_and_duplicates_run_once(tmp_path):
    store = RunStore(tmp_path)
    calls = []

    def work(run: Run) -> None:
        calls.append(run.config.seed)

    configs = [Config("snip", seed=0), Config("snip", seed=1), Config("snip", seed=0, density=1)]
    summary = run_sweep(store, "exp", configs, work, progress=False)
    assert calls == [0, 1] and (summary.ran, summary.skipped) == (2, 0)
    more = configs + [Config("snip", seed=2)]
    summary = run_sweep(store, "exp", more, work, progress=True)
    assert calls == [0, 1, 2] and (summary.ran, summary.skipped) == (1, 2)


def test_keyboard_interrupt_marks_the_run_interrupted(tmp_path):
    store = RunStore(tmp_path)

    def work(run: Run) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(store, "exp", [Config("a"), Config("b")], work, progress=False)
    assert store.status("exp", config_id(Config("a"))) == "interrupted"
    assert store.status("exp", config_id(Config("b"))) is None


def _write_rows(root: str, worker: int, start, count: int) -> None:
    store = RunStore(root)
    start.wait()
    run = store.begin("concurrent", Config("w", seed=worker))
    for step in range(count):
        run.record("step", step, {"worker": worker, "value": step * 0.5})
    run.finish()


def test_two_processes_write_without_losing_a_row(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [
        ctx.Process(target=_write_rows, args=(str(tmp_path), w, start, 200)) for w in range(2)
    ]
    for process in workers:
        process.start()
    start.set()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    rows = RunStore(tmp_path).records("concurrent", kind="step")
    assert len(rows) == 400
    assert sorted((r["worker"], r["step"]) for r in rows) == [
        (w, s) for w in range(2) for s in range(200)
    ]


# -- tensor files ----------------------------------------------------------------------------
def test_tensors_round_trip_bitwise(tmp_path):
    run = RunStore(tmp_path).begin("exp", Config("snip"))
    weights = torch.randn(4, 3)
    weights[0, 0] = float("nan")
    tensors = {
        "weights": weights,
        "index": torch.arange(-5, 5, dtype=torch.int64).reshape(2, 5),
        "mask": torch.rand(7) > 0.5,
        "scalar": torch.tensor(1.5),
    }
    assert not run.has("theta0.safetensors")
    path = run.save_tensors("theta0.safetensors", tensors, metadata={"round": 2})
    assert run.has("theta0.safetensors") and path == run.path("theta0.safetensors")
    loaded = run.load_tensors("theta0.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert loaded[name].numpy().tobytes() == tensor.numpy().tobytes()
    assert tensor_metadata(path) == {"round": 2}
    run.save_json("stats.json", {"acc": np.float64(0.5), "loss": float("inf")})
    assert run.load_json("stats.json") == {"acc": 0.5, "loss": None}
    with pytest.raises(ValueError, match="inside"):
        run.path("../escape.json")
    assert temp_files(tmp_path) == []


def test_damaged_tensor_files_are_refused(tmp_path):
    run = RunStore(tmp_path).begin("exp", Config("snip"))
    path = run.save_tensors("w.safetensors", {"w": torch.randn(64), "m": torch.ones(8).bool()})
    good = path.read_bytes()

    path.write_bytes(good[:-1] + bytes([good[-1] ^ 0x01]))  # one flipped bit in the data
    with pytest.raises(ValueError, match="w.safetensors.*checksum"):
        run.load_tensors("w.safetensors")
    path.write_bytes(good[: len(good) - 10])  # truncated
    with pytest.raises(ValueError, match="w.safetensors"):
        run.load_tensors("w.safetensors")
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="w.safetensors"):
        run.load_tensors("w.safetensors")
    save_file({"w": torch.zeros(2)}, str(run.path("plain.safetensors")))  # no checksum
    with pytest.raises(ValueError, match="plain.safetensors"):
        run.load_tensors("plain.safetensors")
    with pytest.raises(FileNotFoundError):
        run.load_tensors("missing.safetensors")


# -- reports ---------------------------------------------------------------------------------
def test_aggregate_mean_and_sample_std():
    rows = [
        {"method": "snip", "density": 0.1, "acc": 0.9, "loss": 1.0},
        {"method": "grasp", "density": 0.1, "acc": 0.5, "loss": None},
        {"method": "snip", "density": 0.1, "acc": 0.8, "loss": 3.0},
        {"method": "snip", "density": 0.1, "acc": 0.7},
    ]
    snip, grasp = aggregate(rows, by=["method", "density"], values=["acc", "loss"])
    assert (snip["method"], snip["density"], snip["n"]) == ("snip", 0.1, 3)
    assert snip["acc_mean"] == pytest.approx(0.8)
    assert snip["acc_std"] == pytest.approx(0.1)  # sample std of 0.9, 0.8, 0.7
    assert snip["loss_mean"] == pytest.approx(2.0)
    assert snip["loss_std"] == pytest.approx(math.sqrt(2.0))
    assert (grasp["n"], grasp["acc_mean"], grasp["acc_std"]) == (1, 0.5, 0.0)
    assert grasp["loss_mean"] is None and grasp["loss_std"] is None


def test_markdown_and_csv_tables(tmp_path):
    rows = [
        {"method": "snip", "acc": 0.91234, "density": 0.1, "note": "a|b"},
        {"method": "dense", "acc": 0.95, "density": 1.0},
    ]
    text = markdown_table(rows, ["method", "density", "acc", "note"], formats={"acc": ".1%"})
    assert text.splitlines() == [
        "| method | density | acc | note |",
        "|---|---|---|---|",
        "| snip | 0.1 | 91.2% | a\\|b |",
        "| dense | 1 | 95.0% |  |",
    ]
    assert "| 10% |" in markdown_table(rows, ["density"], formats={"density": "{:.0%}"})
    md, csv_path = write_table(rows, ["method", "acc"], tmp_path / "tables" / "pai.v1")
    assert md.name == "pai.v1.md" and csv_path.name == "pai.v1.csv"
    assert md.read_text() == markdown_table(rows, ["method", "acc"])
    with open(csv_path, newline="") as f:
        assert list(csv.reader(f)) == [["method", "acc"], ["snip", "0.91234"], ["dense", "0.95"]]
    assert temp_files(tmp_path) == []


def test_plots_write_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    series = {
        "snip": [(10.0, 0.8, 0.01), (1.0, 0.6, 0.05), (100.0, 0.9, None)],
        "grasp": [(10.0, 0.82, 0.02), (1.0, None, None)],
    }
    line = line_plot(
        series,
        tmp_path / "acc.png",
        "density (%)",
        "accuracy",
        title="t",
        logx=True,
        reference=0.95,
    )
    bars = bar_plot(
        {"snip": {"conv1": 0.5, "fc": 0.05}, "grasp": {"conv1": 0.3, "conv2": 0.2}},
        tmp_path / "layers.png",
        "layer",
        "kept",
    )
    for path in (line, bars):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert temp_files(tmp_path) == []


def test_an_int_given_for_a_float_field_is_the_same_configuration():
    """epochs=3 and epochs=3.0 must name one run (a sweep started from the CLI, which parses
    floats, and one from Python would otherwise redo each other's work)."""
    from winnow import TrainConfig
    from winnow.experiments.at_init import AtInitConfig

    def epochs(value):
        return AtInitConfig(train=TrainConfig(epochs=value))

    assert config_id(epochs(3)) == config_id(epochs(3.0))
    assert config_id(epochs(5)) == config_id(AtInitConfig())
    assert config_id(epochs(3)) != config_id(epochs(4))
