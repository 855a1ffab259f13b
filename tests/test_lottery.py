"""Lottery tickets: magnitude pruning per round, reset and rewinding, controls, resumption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import winnow
import winnow.cli
from winnow.core.masks import Masks
from winnow.experiments import RunStore, lottery
from winnow.schedules import (
    iterative_magnitude_pruning,
    lottery_rates,
    magnitude_prune,
)
from winnow.training import TrainConfig

TINY_TRAIN = {"iterations": 24, "eval_every": 8, "batch_size": 32}
TINY = {
    "model": "mlp",
    "data": "synthetic",
    "rounds": 3,
    "rate": 0.5,
    "train": TrainConfig(**TINY_TRAIN),
}


@pytest.fixture(scope="module")
def data():
    return winnow.data.load("synthetic", n_train=256, n_test=128, seed=0)


def _mlp(seed: int = 0) -> nn.Module:
    return winnow.models.create("mlp", 4, 1, 8, seed=seed, hidden=(32, 16))


def test_lottery_rates_follow_the_paper():
    lenet = winnow.models.create("lenet300", 10, 1, 28)
    assert lottery_rates(lenet, 0.2) == pytest.approx(
        {"layers.1.weight": 0.2, "layers.3.weight": 0.2, "layers.5.weight": 0.1}
    )
    conv2 = winnow.models.create("conv2", 10, 1, 28)
    rates = lottery_rates(conv2, 0.2, conv_rate=0.1)
    convs = [n for n, p in conv2.named_parameters() if p.dim() == 4]
    assert convs and all(rates[n] == 0.1 for n in convs)
    assert list(rates.values())[-1] == 0.1 and sorted(set(rates.values())) == [0.1, 0.2]
    with pytest.raises(ValueError, match="no prunable"):
        lottery_rates(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="sparsity"):
        lottery_rates(lenet, 1.0)


def test_magnitude_prune_removes_the_smallest_remaining_weights_per_layer():
    model = _mlp()
    masks = winnow.select(
        {n: torch.rand(p.shape) for n, p in winnow.prunable_parameters(model).items()},
        0.6,
        scope="layer",
    )
    pruned = magnitude_prune(model, masks, {n: 0.25 for n in masks})
    params = winnow.prunable_parameters(model)
    for name, mask in masks.items():
        alive = int(mask.sum())
        kept = pruned[name]
        assert not (kept & ~mask).any(), "a pruned weight came back"
        assert int(kept.sum()) == alive - round(0.25 * alive)
        magnitude = params[name].detach().abs()
        removed = mask & ~kept
        assert magnitude[removed].max() <= magnitude[kept].min()


def test_magnitude_prune_global_and_bad_rates():
    model = _mlp()
    masks = Masks.ones(model)
    pruned = magnitude_prune(model, masks, 0.3, scope="global")
    assert pruned.num_kept() == masks.numel() - round(0.3 * masks.numel())
    all_magnitudes = torch.cat(
        [p.detach().abs().flatten() for p in winnow.prunable_parameters(model).values()]
    )
    kept = torch.cat([pruned[n].flatten() for n in pruned])
    assert all_magnitudes[~kept].max() <= all_magnitudes[kept].min()
    with pytest.raises(ValueError, match="one rate"):
        magnitude_prune(model, masks, {n: 0.2 for n in masks}, scope="global")
    with pytest.raises(ValueError, match="exactly the masked"):
        magnitude_prune(model, masks, {"layers.1.weight": 0.2})
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(model, masks, 1.5)
    with pytest.raises(ValueError, match="scope"):
        magnitude_prune(model, masks, 0.2, scope="block")


def _config(**kwargs) -> TrainConfig:
    return TrainConfig(**{"iterations": 20, "batch_size": 32, "eval_every": 10, **kwargs})


def test_imp_resets_survivors_to_init_and_follows_the_density_schedule(data):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rounds = list(iterative_magnitude_pruning(model, data, _config(), rounds=3, rate=0.5))
    assert [r.round for r in rounds] == [0, 1, 2, 3]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "the caller's model changed"
    for r in rounds:
        for name, value in r.rewind_state.items():
            assert torch.equal(value, before[name]), "reset must be to θ₀"
        for name, mask in r.masks.items():
            assert r.masks.layer_density()[name] == pytest.approx(0.5**r.round, abs=0.02)
            assert torch.all(r.trained[name][~mask] == 0), "pruned weights must stay zero"
        assert r.result.iterations == 20
    for a, b in zip(rounds, rounds[1:], strict=False):
        assert a.next_masks == b.masks
        assert (b.masks & ~a.masks).num_kept() == 0


def test_imp_rewinds_to_iteration_k_and_trains_from_there(data):
    model = _mlp()
    config = _config()
    rounds = list(
        iterative_magnitude_pruning(model, data, config, rounds=2, rate=0.5, rewind_iteration=5)
    )
    reference = winnow.train(_mlp(), data, _config(save_at=(5,)))
    for name, value in rounds[0].rewind_state.items():
        assert torch.equal(value, reference.checkpoints[5][name])
    assert rounds[0].result.iterations == 20
    assert all(r.result.iterations == 15 for r in rounds[1:])
    assert rounds[1].result.history[0]["iteration"] == 10
    with pytest.raises(ValueError, match="beyond"):
        list(iterative_magnitude_pruning(model, data, config, rounds=1, rewind_iteration=50))


def test_imp_resumed_at_a_round_equals_the_uninterrupted_run(data):
    model = _mlp()
    full = list(
        iterative_magnitude_pruning(model, data, _config(), rounds=3, rate=0.4, rewind_iteration=4)
    )
    resumed = list(
        iterative_magnitude_pruning(
            model,
            data,
            _config(),
            rounds=3,
            rate=0.4,
            rewind_iteration=4,
            start_round=2,
            masks=full[2].masks,
            rewind_state=full[0].rewind_state,
        )
    )
    assert [r.round for r in resumed] == [2, 3]
    for a, b in zip(full[2:], resumed, strict=True):
        assert a.result.history == b.result.history
        assert a.next_masks == b.next_masks
        assert all(torch.equal(a.trained[k], b.trained[k]) for k in a.trained)
    with pytest.raises(ValueError, match="resuming"):
        next(iterative_magnitude_pruning(model, data, _config(), rounds=3, start_round=1))


def _round_rows(results: Path) -> dict:
    rows = RunStore(results).records(lottery.EXPERIMENT, kind="round")
    return {
        (r["seed"], r["control"], r["step"]): {k: v for k, v in r.items() if k != "seconds"}
        for r in rows
    }


def test_experiment_controls_and_report(tmp_path):
    configs = lottery.sweep(seeds=(0, 1), **TINY)
    assert [c.control for c in configs] == ["none", "reinit", "random"] * 2
    store = lottery.run(tmp_path, configs, progress=False)
    rows = _round_rows(tmp_path)
    assert len(rows) == 2 * (4 + 3 + 3)
    ticket_dir = store.run_dir(lottery.EXPERIMENT, winnow.experiments.config_id(configs[0]))
    for r in range(4):
        ticket = rows[(0, "none", r)]
        assert ticket["density"] == pytest.approx(
            Masks.load(ticket_dir / f"masks-{r}.safetensors").density()
        )
        if r:
            # controls train with the ticket's per-layer densities
            for control in ("reinit", "random"):
                assert rows[(0, control, r)]["layer_density"] == ticket["layer_density"]
    assert (ticket_dir / "init.safetensors").exists() and (
        ticket_dir / "rewind.safetensors"
    ).exists()
    paths = lottery.report(tmp_path)
    for key in ("table", "csv", "accuracy", "early_stop", "overlap"):
        assert paths[key].exists() and paths[key].stat().st_size > 0
    text = paths["table"].read_text()
    assert "random reinit" in text and "random mask" in text and "ticket" in text
    overlap = lottery.mask_overlaps(store)
    assert [o["round"] for o in overlap] == [0, 1, 2, 3]
    assert overlap[0]["across seeds"] == 1.0
    for o in overlap[1:]:
        assert 0 < o["across seeds"] < 1 and 0 < o["random expectation"] < 1
        assert o["with previous round"] == pytest.approx(0.5, abs=0.03)


def test_a_control_needs_its_finished_ticket(tmp_path):
    store = RunStore(tmp_path)
    summary = winnow.experiments.run_sweep(
        store,
        lottery.EXPERIMENT,
        [lottery.LotteryConfig(control="reinit", **TINY)],
        lottery.execute,
        progress=False,
    )
    assert summary.failed and "ticket run" in summary.failed[0][1]


def test_config_validation():
    with pytest.raises(ValueError, match="control"):
        lottery.LotteryConfig(control="shuffle")
    with pytest.raises(ValueError, match="sparsity"):
        lottery.LotteryConfig(rate=1.0)
    with pytest.raises(ValueError, match="model"):
        lottery.LotteryConfig(model="alexnet")
    with pytest.raises(ValueError, match="scope"):
        lottery.LotteryConfig(scope="block")


KILLER = """
import os, signal, sys
import winnow.schedules.lottery as schedule
from winnow import TrainConfig
from winnow.experiments import lottery

calls = {{"n": 0}}
original = schedule.train

def train(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)

schedule.train = train
tiny = dict({tiny!r}, train=TrainConfig(**{train!r}))
lottery.run(sys.argv[1], lottery.sweep(seeds=(0,), controls=("none",), **tiny), progress=False)
"""


@pytest.mark.parametrize("kill_at", [1, 3])
def test_killed_mid_round_resumes_and_equals_an_uninterrupted_run(tmp_path, kill_at):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    flat = {k: v for k, v in TINY.items() if k != "train"}
    script = textwrap.dedent(KILLER.format(kill_at=kill_at, tiny=flat, train=TINY_TRAIN))
    env = {**os.environ, "PYTHONPATH": str(Path(winnow.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script, str(killed)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    store = RunStore(killed)
    (run,) = store.runs(lottery.EXPERIMENT)
    assert run["status"] == "running"
    assert len(store.records(lottery.EXPERIMENT, kind="round", status=None)) == kill_at - 1
    configs = lottery.sweep(seeds=(0,), controls=("none",), **TINY)
    lottery.run(killed, configs, progress=False)
    lottery.run(clean, configs, progress=False)
    assert _round_rows(killed) == _round_rows(clean)
    killed_dir = next((killed / lottery.EXPERIMENT).iterdir())
    clean_dir = next((clean / lottery.EXPERIMENT).iterdir())
    for r in range(TINY["rounds"] + 2):
        name = f"masks-{r}.safetensors"
        assert Masks.load(killed_dir / name) == Masks.load(clean_dir / name)
    assert not list(killed_dir.glob(".*tmp*")), "a temporary file was left behind"


def test_cli_lottery_and_report(tmp_path, capsys):
    args = [
        "experiment",
        "lottery",
        "--model",
        "mlp",
        "--data",
        "synthetic",
        "--rounds",
        "2",
        "--rate",
        "0.5",
        "--iterations",
        "16",
        "--eval-every",
        "8",
        "--seeds",
        "0",
        "--controls",
        "none,reinit",
        "--results",
        str(tmp_path),
        "--no-progress",
    ]
    assert winnow.cli.main(args) == 0
    out = capsys.readouterr().out
    assert "random reinit" in out and "ticket" in out
    assert winnow.cli.main(["experiment", "report", "lottery", "--results", str(tmp_path)]) == 0
    assert winnow.cli.main([*args[:-3], "--controls", "bogus", "--results", str(tmp_path)]) == 2
