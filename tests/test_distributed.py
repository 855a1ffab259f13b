"""Data-parallel training with real ``torch.distributed``: two processes on this machine, gloo.

The processes are started by :func:`winnow.distributed.launch` (``torch.multiprocessing``
with torchrun's environment variables), so :func:`winnow.train` initialises the process group
itself as under ``torchrun``. One job runs most scenarios in the same two processes (each
process starts in seconds, the runs are tiny); every rank saves what it saw and the tests
compare the ranks with each other and with a single process here.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from winnow.core.masks import Masks
from winnow.core.prunable import unwrap
from winnow.distributed import launch, shard
from winnow.resumable import load_state
from winnow.training import Callback, TrainConfig, train

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORLD = 2
N = 67  # 4 batches of 16 and one of 3, which the two ranks split 1 and 2


def _model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 24), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(24, 3))


def _data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _masks(model: nn.Module, seed: int = 5) -> Masks:
    g = torch.Generator().manual_seed(seed)
    return Masks(
        {
            n: torch.rand(p.shape, generator=g) < 0.5
            for n, p in model.named_parameters()
            if n.endswith("weight")
        }
    )


SGD = TrainConfig(iterations=6, batch_size=16, optimizer="sgd", lr=0.1, eval_every=3)
ADAM = TrainConfig(
    iterations=4, batch_size=16, optimizer="adam", lr=0.01, accumulate=2, clip_norm=1.0,
    eval_every=2,
)  # fmt: skip
RESUME = TrainConfig(iterations=12, batch_size=16, optimizer="adam", lr=0.01, eval_every=3)


def _equality_runs():
    """(name, config, masked, examples) of the runs compared with a single process; with 65
    examples the epoch's last batch holds one, so rank 0 has none and adds weight 0."""
    return [
        ("sgd", SGD, False, N),
        ("adam-masked", ADAM, True, N),
        ("last-batch-of-one", dataclasses.replace(SGD, iterations=5), False, 65),
        ("adam-masked-50-steps", dataclasses.replace(ADAM, iterations=50, eval_every=25), True, N),
    ]


def _train_dense_or_masked(
    config: TrainConfig, masked: bool, model: nn.Module | None = None, n: int = N
):
    model = _model() if model is None else model
    masks = _masks(unwrap(model)) if masked else None
    result = train(model, _data(n), config, masks, eval_splits={"all": _data(n)})
    return unwrap(model), result


def _pruning_config(optimizer: str) -> TrainConfig:
    return TrainConfig(
        iterations=12, batch_size=16, optimizer=optimizer, lr=0.05, momentum=0.9, eval_every=6
    )


class ZerosStay(Callback):
    """After every step: are the pruned weights of the masks in force exactly 0.0 here?"""

    def __init__(self, pruner):
        self.pruner, self.ok, self.steps = pruner, True, 0

    def after_step(self, iteration, model):
        if self.pruner.masks is None:
            return
        params = dict(model.named_parameters())
        for name, keep in self.pruner.masks.items():
            self.ok &= bool((params[name].detach()[~keep] == 0).all())
        self.steps += 1


class _RankPruner:
    """Prunes at iteration 2 to masks drawn from its rank's own seed."""

    def __init__(self):
        self.masks = None

    def step(self, iteration, model):
        if iteration != 2:
            return None
        self.masks = _masks(model, seed=20 + int(os.environ["RANK"]))
        return self.masks


def _count_reductions(state, bucket):
    """DDP communication hook: count the all-reduces and what they carry at pruned entries."""
    state["count"] += 1
    for param, gradient in zip(bucket.parameters(), bucket.gradients(), strict=True):
        keep = state["masks"].get(state["names"][id(param)])
        if keep is not None:
            state["pruned"] += float(gradient[~keep].abs().sum())
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.allreduce_hook(None, bucket)


def _scenarios(out: Path) -> None:
    """Every scenario of the shared job, in one of the two processes."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    saved: dict = {}
    # a DDP step equals the single-process step on the global batch
    for name, config, masked, n in _equality_runs():
        model, result = _train_dense_or_masked(config, masked, n=n)
        saved[name] = {"weights": model.state_dict(), "history": result.history}
    # masking adds no all-reduce: DDP (wrapped here, with a counting hook) reduces once a step
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    state = {"count": 0, "pruned": 0.0, "masks": _masks(model), "names": names}
    wrapped = nn.parallel.DistributedDataParallel(model)
    wrapped.register_comm_hook(state, _count_reductions)
    model, result = _train_dense_or_masked(ADAM, True, wrapped)
    saved["prewrapped"] = {
        "weights": model.state_dict(), "reductions": state["count"], "pruned": state["pruned"],
    }  # fmt: skip
    # pruning during training: zeros stay exactly zero on both ranks, the ranks stay equal
    from winnow.schedules import DynamicSparsity, GradualPruner

    pruners = {
        "gradual-adam": (lambda: GradualPruner(0.8, 2, 10, 2, scope="layer"), "adam"),
        "gradual-sgd": (lambda: GradualPruner(0.8, 2, 10, 2, scope="layer"), "sgd"),
        "rigl-sgd": (lambda: DynamicSparsity(0.3, 12, grow="gradient", update_every=3), "sgd"),
    }
    for name, (make, optimizer) in pruners.items():
        model, pruner = _model(), make()
        watch = ZerosStay(pruner)
        result = train(model, _data(), _pruning_config(optimizer), pruner=pruner, callbacks=[watch])
        saved[name] = {
            "weights": model.state_dict(), "masks": dict(result.masks), "ok": watch.ok,
            "steps": watch.steps, "history": result.history,
        }  # fmt: skip
    # iterative magnitude pruning: masks chosen between rounds alike on every rank
    from winnow.schedules import iterative_magnitude_pruning

    rounds = iterative_magnitude_pruning(
        _model(), _data(), dataclasses.replace(SGD, iterations=4), rounds=3, rate=0.5
    )
    saved["imp"] = [
        {"masks": dict(r.next_masks), "trained": r.trained, "history": r.result.history}
        for r in rounds
    ]
    # a pruner that chooses differently on each rank: rank 0's choice is enforced everywhere
    pruner = _RankPruner()
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(model, _data(), SGD, pruner=pruner)
    saved["settled"] = {
        "warnings": [str(w.message) for w in caught], "masks": dict(result.masks),
        "pruner": dict(pruner.masks), "weights": model.state_dict(),
    }  # fmt: skip
    # different masks on the ranks: a clear error on every rank
    try:
        train(_model(), _data(), SGD, _masks(_model(), seed=5 + rank))
    except ValueError as err:
        saved["mismatch"] = str(err)
    # a global batch the ranks cannot share evenly
    try:
        train(_model(), _data(), dataclasses.replace(SGD, batch_size=15))
    except ValueError as err:
        saved["indivisible"] = str(err)
    # an iterable with a DistributedSampler: every rank reads its own share
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    dataset = TensorDataset(*_data())
    loader = DataLoader(dataset, batch_size=8, sampler=DistributedSampler(dataset, seed=3))
    model = _model()
    train(model, loader, dataclasses.replace(SGD, epochs=2.0, iterations=None))
    saved["sampler"] = model.state_dict()
    # the uninterrupted run the resume test compares with
    model = _model(dropout=0.2)
    result = train(model, _data(), RESUME, _masks(model))
    saved["uninterrupted"] = {"weights": model.state_dict(), "history": result.history}
    torch.save(saved, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(_scenarios, WORLD, (out,))
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _single(config: TrainConfig, masked: bool, n: int = N):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_dense_or_masked(config, masked, n=n)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name, config, masked, n", _equality_runs())
def test_ddp_step_equals_the_single_process_step_on_the_global_batch(job, name, config, masked, n):
    model, result = _single(config, masked, n)
    for rank in job:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(rank[name]["weights"][key], value, atol=1e-5, rtol=0)
        assert len(rank[name]["history"]) == len(result.history)
        for theirs, ours in zip(rank[name]["history"], result.history, strict=True):
            assert theirs.keys() == ours.keys() and theirs["iteration"] == ours["iteration"]
            for key in ("train_loss", "all_loss", "all_acc"):
                assert theirs[key] == pytest.approx(ours[key], abs=1e-5)
    for key in model.state_dict():
        assert torch.equal(job[0][name]["weights"][key], job[1][name]["weights"][key])
    assert job[0][name]["history"] == job[1][name]["history"]


def test_a_wrapped_model_is_used_and_masking_adds_no_all_reduce(job):
    model, _ = _single(ADAM, True)
    for rank in job:
        # accumulate=2: the first batch of a step does not synchronise; one bucket, one
        # all-reduce per optimizer step, whatever the enforcement masks
        assert rank["prewrapped"]["reductions"] == ADAM.iterations
        # masked before DDP copies it to its bucket: the all-reduce carries zeros there
        assert rank["prewrapped"]["pruned"] == 0.0
        for key, value in model.state_dict().items():
            torch.testing.assert_close(rank["prewrapped"]["weights"][key], value, atol=1e-5, rtol=0)
    masks = _masks(_model())
    for name, keep in masks.items():
        for rank in job:
            assert (rank["prewrapped"]["weights"][name][~keep] == 0).all()


@pytest.mark.parametrize("name", ["gradual-adam", "gradual-sgd", "rigl-sgd"])
def test_pruned_weights_stay_exactly_zero_and_ranks_stay_identical(job, name):
    first, second = job[0][name], job[1][name]
    assert first["ok"] and second["ok"]
    assert first["steps"] == second["steps"] > 0
    assert first["masks"].keys() == second["masks"].keys()
    for key, keep in first["masks"].items():
        assert torch.equal(keep, second["masks"][key])
        assert (first["weights"][key][~keep] == 0).all()
        assert 0 < keep.sum() < keep.numel()
    for key, value in first["weights"].items():
        assert torch.equal(value, second["weights"][key])  # bit for bit
    assert first["history"] == second["history"]


def test_iterative_magnitude_pruning_rounds_are_identical_on_every_rank(job):
    first, second = job
    assert len(first["imp"]) == len(second["imp"]) == 4  # the dense round and 3 more
    for one, other in zip(first["imp"], second["imp"], strict=True):
        assert one["history"] == other["history"]
        for key, keep in one["masks"].items():
            assert torch.equal(keep, other["masks"][key])
        for key, value in one["trained"].items():
            assert torch.equal(value, other["trained"][key])
    assert 0 < sum(int(k.sum()) for k in first["imp"][-1]["masks"].values())


def test_pruning_decisions_that_differ_are_settled_by_rank_0s_masks(job):
    expected = _masks(_model(), seed=20)
    for rank in job:
        settled = rank["settled"]
        assert any("rank(s) 1" in w and "rank 0's masks" in w for w in settled["warnings"])
        for name, keep in expected.items():
            assert torch.equal(settled["masks"][name], keep)
            assert torch.equal(settled["pruner"][name], keep)
            assert (settled["weights"][name][~keep] == 0).all()
    for key, value in job[0]["settled"]["weights"].items():
        assert torch.equal(value, job[1]["settled"]["weights"][key])


def test_masks_that_differ_between_ranks_are_a_clear_error(job):
    for rank in job:
        message = rank["mismatch"]
        assert "masks on rank(s) 1" in message and "rank 0" in message


def test_a_global_batch_not_divisible_by_the_processes_is_a_clear_error(job):
    for rank in job:
        assert "batch_size 15" in rank["indivisible"] and "divisible by 2" in rank["indivisible"]


def test_an_iterable_with_a_distributed_sampler_trains_alike_on_both_ranks(job):
    for key, value in job[0]["sampler"].items():
        assert torch.equal(value, job[1]["sampler"][key])


def test_shard_splits_every_batch_into_disjoint_slices_that_make_the_whole():
    from winnow.distributed import Group

    x, y = _data(7)
    for m in (1, 2, 3, 7):
        parts = [shard((x[:m], y[:m]), Group(r, 3, torch.device("cpu"))) for r in range(3)]
        kept = [p for (p, weight) in parts if weight > 0]
        assert torch.equal(torch.cat([b[1] for b in kept]), y[:m])
        # DDP averages the ranks' weighted mean losses: every example counts 1/m
        for (_, yb), weight in parts:
            if weight > 0:
                assert weight / (3 * len(yb)) == pytest.approx(1 / m)


class _Kill(Callback):
    def after_step(self, iteration, model):
        if iteration == 7:  # after the state saved at 6, before the one at 9
            os.kill(os.getpid(), signal.SIGKILL)


def _resumable(out: Path, kill: bool) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    state = out / "state"
    state.mkdir(exist_ok=True)
    # every file this process opens for writing in the state's directory, logged at once
    log = os.open(out / f"writes{rank}-{int(kill)}.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def audit(event, args):
        if event != "open" or not isinstance(args[0], str | bytes | os.PathLike):
            return
        mode, flags = args[1], args[2]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        path = os.path.abspath(os.fsdecode(args[0]))
        if writes and os.path.dirname(path) == str(state):
            os.write(log, f"{path}\n".encode())

    sys.addaudithook(audit)
    model = _model(dropout=0.2)
    callbacks = [_Kill()] if kill else []
    result = train(
        model, _data(), RESUME, _masks(model), checkpoint=state / "run.state",
        callbacks=callbacks,
    )  # fmt: skip
    torch.save({"weights": model.state_dict(), "history": result.history}, out / f"r{rank}.pt")


def test_rank_0_alone_writes_the_state_and_a_killed_run_resumes_to_the_same_weights(job, tmp_path):
    with pytest.raises(RuntimeError, match="SIGKILL|exit status"):
        launch(_resumable, WORLD, (tmp_path, True))
    assert (tmp_path / "state" / "run.state").is_file()
    saved = load_state(tmp_path / "state" / "run.state")
    assert saved["iteration"] == 6 and len(saved["rng_ranks"]) == WORLD
    launch(_resumable, WORLD, (tmp_path, False))
    for rank in range(WORLD):
        writes = (tmp_path / f"writes{rank}-1.txt").read_text() + (
            tmp_path / f"writes{rank}-0.txt"
        ).read_text()
        assert bool(writes.strip()) == (rank == 0), f"rank {rank} wrote {writes!r}"
        resumed = torch.load(tmp_path / f"r{rank}.pt")
        expected = job[rank]["uninterrupted"]
        assert resumed["history"] == expected["history"]
        for key, value in expected["weights"].items():
            assert torch.equal(resumed["weights"][key], value)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["run.state"]


TORCHRUN_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_distributed import SGD, _data, _model
from winnow.training import train

torch.set_num_threads(1)
model = _model()
result = train(model, _data(), SGD, eval_splits={{"all": _data()}})
saved = {{"weights": model.state_dict(), "history": result.history, "backend": dist.get_backend()}}
torch.save(saved, os.path.join({out!r}, "torchrun" + os.environ["RANK"] + ".pt"))
"""


def test_torchrun_runs_train_unchanged(job, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(script),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"torchrun{rank}.pt")
        assert saved["backend"] == "gloo"
        assert saved["history"] == job[rank]["sgd"]["history"]
        for key, value in job[rank]["sgd"]["weights"].items():
            assert torch.equal(saved["weights"][key], value)


def test_cli_train_nproc_2_on_digits(tmp_path):
    from winnow import data as datasets
    from winnow import models
    from winnow.cli.commands import TRAIN_DEFAULTS

    out = tmp_path / "weights.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-c", "import sys; from winnow.cli import main; sys.exit(main())",
        "train", "--nproc", "2", "--model", "mlp", "--data", "digits", "--iterations", "20",
        "--eval-every", "10", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "data-parallel training in 2 processes" in done.stdout
    assert done.stdout.count("early stop") == 1  # rank 0 reports, rank 1 is quiet
    assert f"weights written to {out}" in done.stdout
    from safetensors.torch import load_file

    trained = load_file(out)
    config = dataclasses.replace(TRAIN_DEFAULTS, epochs=None, iterations=20, eval_every=10)
    data = datasets.load("digits", seed=0)
    model = models.create_for("mlp", data, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model, data, config)
    finally:
        torch.set_num_threads(threads)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(trained[key], value, atol=1e-5, rtol=0)


def test_cli_nproc_with_an_indivisible_batch_is_one_line(capsys):
    from winnow.cli import main

    status = main(
        ["train", "--nproc", "2", "--model", "mlp", "--data", "digits", "--iterations", "1",
         "--batch-size", "15"]
    )  # fmt: skip
    assert status == 2
    assert "divisible by --nproc 2" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_gradual_pruning_under_ddp_gives_the_single_process_masks(job, optimizer):
    from winnow.schedules import GradualPruner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        pruner = GradualPruner(0.8, 2, 10, 2, scope="layer")
        result = train(model, _data(), _pruning_config(optimizer), pruner=pruner)
    finally:
        torch.set_num_threads(threads)
    ranks = job[0][f"gradual-{optimizer}"]
    for key, keep in result.masks.items():
        assert torch.equal(ranks["masks"][key], keep), key
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ranks["weights"][key], value, atol=1e-5, rtol=0)
