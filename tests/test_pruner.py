"""The Pruner and its schedules; typed criteria; options generated for the command line."""

import dataclasses

import pytest
import torch

import winnow
import winnow.cli
from winnow import Pruner
from winnow.criteria import lookup
from winnow.schedules import (
    ExponentialRounds,
    Gradual,
    GradualPruner,
    OneShot,
    Phases,
    PruneRate,
)


@pytest.fixture(scope="module")
def data():
    return winnow.data.load("synthetic", n_train=200, n_test=50, input_shape=(1, 8, 8))


def mlp(seed=0):
    return winnow.models.create("mlp", input_size=8, num_classes=4, hidden=[24, 12], seed=seed)


def test_prune_runs_the_schedule_on_a_private_copy_every_time(data):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = Pruner("snip", ExponentialRounds(0.1, rounds=3), data=data, options={"samples": 64})
    first, second = pruner.prune(model), pruner.prune(model)
    assert first == second  # no state carried from one call to the next
    assert first.num_kept() == round(0.1 * first.numel())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    copy, masks = pruner.pruned(model)
    for name, param in winnow.prunable_parameters(copy).items():
        assert torch.all(param[~masks[name]] == 0)


def test_step_follows_the_schedule_and_a_function_can_score(data):
    model = mlp()
    pruner = Pruner(lambda m: {n: p.abs() for n, p in winnow.prunable_parameters(m).items()},
                    Gradual(0.75, begin=0, end=20, frequency=10))  # fmt: skip
    assert pruner.step(5, model) is None
    densities = [pruner.step(t, model).density() for t in (0, 10, 20)]
    assert densities[0] == pytest.approx(1.0) and densities[-1] == pytest.approx(0.25, abs=1e-3)
    assert densities == sorted(densities, reverse=True)
    reference = GradualPruner(0.75, begin=0, end=20, frequency=10)
    for t in (0, 10, 20):
        reference.step(t, model)
    assert reference.masks == pruner.masks


def test_prune_rate_removes_a_fraction_of_the_weights_alive():
    model = mlp()
    pruner = Pruner("magnitude", PruneRate(0.5, scope="layer"))
    for k in range(1, 4):
        masks = pruner.step(k, model)
        for name, density in masks.layer_density().items():
            numel = masks[name].numel()
            assert density == pytest.approx(0.5**k, abs=1.5 / numel)


def test_phases_choose_afresh():
    model = mlp()
    pruner = Pruner("magnitude", Phases([(0, 0.2), (5, 1.0), (9, 0.5)]))
    assert pruner.step(0, model).density() == pytest.approx(0.2, abs=1e-3)
    assert pruner.step(5, model).density() == 1.0
    assert pruner.step(9, model).density() == pytest.approx(0.5, abs=1e-3)


def test_an_update_rule_runs_after_each_selection(data):
    seen = []

    def rule(scoring, before, after):
        seen.append((before, after.density()))

    Pruner("magnitude", ExponentialRounds(0.25, rounds=2), update=rule).prune(mlp())
    assert [round(d, 3) for _, d in seen] == [0.5, 0.25] and seen[0][0] is None


def test_bad_pruners_are_errors(data):
    with pytest.raises(ValueError, match="schedule"):
        Pruner("magnitude")
    with pytest.raises(ValueError, match="unknown criterion 'snap'"):
        Pruner("snap", OneShot(0.1))
    with pytest.raises(ValueError, match="needs data"):
        Pruner("snip", OneShot(0.1))
    with pytest.raises(ValueError, match="scope"):
        Pruner("magnitude", OneShot(0.1), scope="block")
    with pytest.raises(ValueError, match="drive it with step"):
        Pruner("magnitude", PruneRate(0.2)).prune(mlp())
    with pytest.raises(ValueError, match="density"):
        OneShot(1.5)


def test_criteria_declare_their_options(data):
    snip = lookup("snip")
    assert snip.needs_data and snip.takes_seed() and "samples" in snip.option_names()
    assert not lookup("synflow").takes_seed() and not lookup("magnitude").needs_data
    with pytest.raises(ValueError, match="has no option 'sample'.*samples, batch_size"):
        winnow.score(mlp(), "snip", data, sample=64)
    with pytest.raises(ValueError, match="positive integer"):
        winnow.score(mlp(), "snip", data, samples=0)
    with pytest.raises(ValueError, match="bn_mode"):
        winnow.score(mlp(), "grasp", data, bn_mode="test")


def test_synflow_keeps_its_state_off_the_model():
    model = mlp()
    pruner = Pruner("synflow", ExponentialRounds(0.2, rounds=4), options={"input_shape": (1, 8, 8)})
    copy, _ = pruner.pruned(model)
    names = {n for m in (model, copy) for n in vars(m) if "synflow" in n}
    assert names == set()


def test_train_options_come_from_the_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        winnow.cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--weight-decay" in text and "(default: 0.0)" in text and "{sgd,adam,adamw}" in text
    code = winnow.cli.main(["train", "--model", "mlp", "--data", "synthetic", "--epochs", "0"])
    assert code == 2 and "epochs must be > 0" in capsys.readouterr().err
    out = tmp_path / "w.safetensors"
    args = [
        "train",
        "--model",
        "mlp",
        "--data",
        "synthetic",
        "--iterations",
        "3",
        "--out",
        str(out),
    ]
    assert winnow.cli.main([*args, "--no-progress"]) == 0
    assert "3 iterations" in capsys.readouterr().out and out.is_file()


def test_experiment_options_cover_every_field(capsys):
    from winnow.experiments import EXPERIMENTS

    for experiment in EXPERIMENTS.values():
        with pytest.raises(SystemExit):
            winnow.cli.main(["experiment", experiment.name, "--help"])
        text = capsys.readouterr().out
        swept = {axis.field for axis in experiment.axes}
        for field in dataclasses.fields(experiment.config):
            if field.name == "train":
                assert "--lr" in text and "--optimizer" in text
            elif field.name not in swept:
                assert f"--{field.name.replace('_', '-')}" in text, field.name
        for axis in experiment.axes:
            assert f"--{axis.option}" in text
