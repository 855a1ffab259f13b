"""The sparse-training experiment: every method at equal density and budget, training FLOPs,
resumption of a run killed mid-training, the report, and the command line."""

import pytest
import torch

from winnow import TrainConfig
from winnow.cli import main
from winnow.experiments import sparse_training as st
from winnow.experiments.store import RunStore


def tiny(**overrides):
    options = dict(
        model="lenet300", data="digits", densities=(0.1,), seeds=(0,),
        train=TrainConfig(iterations=60, batch_size=32, eval_every=20), data_limit=300,
        update_every=10,
    )  # fmt: skip
    options.update(overrides)
    return st.sweep(**options)


def test_every_method_trains_to_the_density_with_its_flops(tmp_path):
    configs = tiny(budgets=(1.0, 2.0))
    methods = {(c.method, c.distribution, c.budget) for c in configs}
    assert ("rigl", "erk", 2.0) in methods and ("snip", "global", 1.0) in methods
    # per budget: dense, 3 methods x 2 distributions, snip, synflow, gradual; one lottery
    assert len(configs) == 2 * (1 + 3 * 2 + 3) + 1
    store, summary = st.EXPERIMENT_SPEC.run(tmp_path, configs, progress=False)
    assert not summary.failed
    rows = store.records(st.EXPERIMENT, kind="result")
    assert len(rows) == len(configs)
    for row in rows:
        if row["method"] != "lottery":
            assert row["iterations"] == 60 * row["budget"]
        assert row["density_kept"] == pytest.approx(row["density"], abs=2e-3)
        flops = row["train_flops_relative"]
        if row["method"] in ("static", "set", "snip", "synflow"):
            assert flops == pytest.approx(row["density"], rel=0.05)  # LeNet: MACs = weights
        elif row["method"] == "rigl":  # dense gradient at 4 of 60 steps (updates at 10..40)
            updates = len(range(10, int(0.75 * row["iterations"]), 10))
            steps = row["iterations"]
            d = row["density_kept"]
            expected = ((steps - updates) * 3 * d + updates * (2 * d + 1)) / (3 * steps)
            assert flops == pytest.approx(expected, rel=0.02)
        elif row["method"] == "gradual":
            assert row["density"] < flops < 1.0
        elif row["method"] == "lottery":  # round 10 of ~20.6% a round: 10.0% kept
            assert row["lottery_round"] == 10
            assert flops == pytest.approx(sum(0.1 ** (k / 10) for k in range(11)), rel=0.01)
        else:
            assert flops == 1.0
    paths = st.report(tmp_path)
    table = paths["table"].read_text()
    assert "rigl (erk, 2x)" in table and "training FLOPs" in table
    assert paths["accuracy-lenet300"].stat().st_size > 0


def test_a_run_killed_mid_training_resumes_to_the_same_record(tmp_path, monkeypatch):
    (config,) = [c for c in tiny() if c.method == "rigl" and c.distribution == "erk"]
    st.EXPERIMENT_SPEC.run(tmp_path / "whole", [config], progress=False)
    reference = RunStore(tmp_path / "whole").records(st.EXPERIMENT, kind="result")[0]

    original = st.train

    def killed(*args, callbacks=(), **kwargs):
        class At(st.Callback):
            def after_step(self, iteration, model):
                if iteration == 50:
                    raise SystemExit(1)  # the process is killed here

        return original(*args, callbacks=[*callbacks, At()], **kwargs)

    monkeypatch.setattr(st, "train", killed)
    with pytest.raises(SystemExit):
        st.EXPERIMENT_SPEC.run(tmp_path / "killed", [config], progress=False)
    store = RunStore(tmp_path / "killed")
    (run,) = store.runs(st.EXPERIMENT)
    assert (tmp_path / "killed" / st.EXPERIMENT / run["run_id"] / st.STATE_FILE).exists()
    steps = []

    def counted(*args, callbacks=(), **kwargs):
        class Count(st.Callback):
            def after_step(self, iteration, model):
                steps.append(iteration)

        return original(*args, callbacks=[*callbacks, Count()], **kwargs)

    monkeypatch.setattr(st, "train", counted)
    st.EXPERIMENT_SPEC.run(tmp_path / "killed", [config], progress=False)
    assert steps == list(range(41, 61))  # resumed from the state saved at iteration 40
    again = store.records(st.EXPERIMENT, kind="result")[0]
    for key in ("test_acc", "val_acc", "early_stop_test_acc", "density_kept", "layer_density"):
        assert again[key] == reference[key], key


def test_configuration_errors():
    with pytest.raises(ValueError, match="takes distribution uniform or erk"):
        st.SparseTrainingConfig(method="rigl", distribution="global")
    with pytest.raises(ValueError, match="takes distribution global"):
        st.SparseTrainingConfig(method="snip", distribution="erk")
    with pytest.raises(ValueError, match="unknown method"):
        st.SparseTrainingConfig(method="lottery-ish")
    with pytest.raises(ValueError, match="budget"):
        st.SparseTrainingConfig(budget=0)
    with pytest.raises(ValueError, match="its budget is 1"):
        st.SparseTrainingConfig(method="lottery", distribution="global", budget=2)


def test_weight_macs_of_a_convolution():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5)
    )
    macs = st.weight_macs(model, torch.zeros(4, 3, 8, 8))
    assert macs == {"0.weight": 8 * 6 * 6 * 3 * 3 * 3, "2.weight": 8 * 6 * 6 * 5}


def test_command_line_runs_and_reports(tmp_path):
    args = [
        "experiment", "sparse-training", "--methods", "set,rigl", "--distributions", "erk",
        "--densities", "20%", "--seeds", "0", "--data", "digits", "--data-limit", "200",
        "--iterations", "30", "--eval-every", "10", "--update-every", "10",
        "--results", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    rows = RunStore(tmp_path).records(st.EXPERIMENT, kind="result")
    assert sorted(r["method"] for r in rows) == ["dense", "rigl", "set"]
