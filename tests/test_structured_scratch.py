"""Gates, Pruning from Scratch, FLOPs budgets, the baselines and the scratch experiment."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import winnow
from winnow import models
from winnow.cli import main as cli_main
from winnow.experiments import scratch as experiment
from winnow.experiments.store import RunStore
from winnow.structured import (
    add_gates,
    analyse,
    bn_l1,
    count,
    l1_filter_structure,
    learn_gates,
    mean_correlation,
    network_slimming,
    prune_from_scratch,
    rebuild,
    scratch_b_epochs,
    set_gates,
    slimming_structure,
    structure_correlation,
    threshold_for_budget,
    uniform_structure,
)

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL_VGG = {"widths": [8, 16, 16, 16, 24, 24, 24, 24]}


@pytest.fixture(scope="module")
def data():
    return winnow.data.load("synthetic", limit=200)


@pytest.mark.parametrize(
    ("name", "options", "shape"),
    [
        ("vgg11", SMALL_VGG, (1, 28, 28)),
        ("resnet20", {"width": 4}, (3, 16, 16)),
        ("lenet5", {}, (1, 28, 28)),
        ("mlp", {}, (1, 8, 8)),
    ],
)
def test_gates_at_one_leave_outputs_unchanged(name, options, shape):
    model = models.create(name, in_channels=shape[0], input_size=shape[1:], **options)
    gated, groups = add_gates(model, shape)
    assert groups
    x = torch.randn(4, *shape)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(gated, mode)()
        with torch.no_grad():
            assert torch.equal(gated(x), model(x))


def test_gates_sit_after_batchnorm_and_skip_residual_ties():
    vgg = models.create("vgg11", **SMALL_VGG)
    _, groups = add_gates(vgg, (1, 28, 28))
    assert len(groups) == 8  # one per conv; never the classifier
    assert all(len(g.gate_after) == 1 and g.gate_after[0] == g.norms[0] for g in groups)

    resnet = models.create("resnet20", width=4, in_channels=3)
    _, groups = add_gates(resnet, (3, 16, 16))
    assert [g.name for g in groups] == [
        f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)
    ]  # only the first convolution of each basic block
    gated, groups = add_gates(resnet, (3, 16, 16), include_tied=True)
    assert len(groups) == 12 and sum(g.tied for g in groups) == 3
    stem = next(g for g in groups if g.name == "conv1")
    assert len(stem.gate_after) == 4  # the stem and the three blocks writing into the sum
    # a zero gate on a tied group zeroes the channel everywhere in the residual stream
    set_gates(gated, {"conv1": torch.tensor([0.0, 1, 1, 1])})
    gated.eval()
    seen = []
    hook = gated.get_submodule("layer1.2.relu").register_forward_hook(
        lambda m, i, o: seen.append(o)
    )
    with torch.no_grad():
        gated(torch.randn(2, 3, 16, 16))
    hook.remove()
    assert torch.all(seen[-1][:, 0] == 0)


def test_learn_gates_moves_only_the_gates(data):
    model = models.create_for("vgg11", data, **SMALL_VGG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = learn_gates(model, data, iterations=6, batch_size=32, lr=0.05, seed=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])  # the model given is untouched
    assert set(result.gates) == {g.name for g in result.groups}
    values = torch.cat(list(result.gates.values()))
    assert values.min() >= 0 and values.max() <= 1
    assert not torch.all(values == 1)
    assert result.iterations == 6 and result.history[-1]["iteration"] == 6
    assert result.chosen in result.history

    # in the gated copy the weights stay at their random initialisation
    gated, _ = add_gates(model, data.input_shape)
    params = dict(gated.named_parameters())
    for name, value in model.named_parameters():
        assert torch.equal(params[name], value)


def test_learn_gates_keeps_the_best_epoch_within_the_ratio(data):
    model = models.create_for("vgg11", data, **SMALL_VGG)
    result = learn_gates(model, data, epochs=3, batch_size=64, lr=0.3, ratio=0.5, seed=1)
    eligible = [row for row in result.history if row["nonzero"] <= 0.5]
    if eligible:
        assert result.chosen["val_acc"] == max(row["val_acc"] for row in eligible)
        assert result.chosen["nonzero"] <= 0.5
    else:
        assert result.chosen == result.history[-1]


def within_budget(structure, budget, tolerance=1e-3):
    ratio = structure.flops_ratio
    return budget - 0.02 <= ratio <= budget + tolerance * (1 - budget) + 1e-12


@pytest.mark.parametrize("budget", [0.5, 0.3, 0.25])
def test_bisection_meets_the_budget(budget):
    model = models.create("vgg11", input_size=28)  # full widths: analysis only, no training
    analysis = analyse(model, (1, 28, 28))
    gen = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(g.size, generator=gen) for g in analysis.prunable()}
    structure = threshold_for_budget(scores, analysis, budget)
    assert within_budget(structure, budget)
    assert structure.dense_flops == count(model, (1, 28, 28)).flops
    # one global threshold: every kept channel scores at least as high as every pruned one
    kept = torch.cat([scores[k][m] for k, m in structure.masks.items()])
    pruned = torch.cat([scores[k][~m] for k, m in structure.masks.items()])
    assert kept.min() >= pruned.max()


def test_an_unreachable_budget_is_refused():
    model = models.create("lenet5")  # the classifier's input from 16 x 5 x 5 stays
    with pytest.raises(ValueError, match="below the smallest structure"):
        uniform_structure(model, 0.001, (1, 28, 28))


def test_ties_and_rounding():
    model = models.create("vgg11", **SMALL_VGG)
    analysis = analyse(model, (1, 28, 28))
    ones = {g.name: torch.ones(g.size) for g in analysis.prunable()}  # all gates clamped at 1
    a = threshold_for_budget(ones, analysis, 0.5, seed=0)
    b = threshold_for_budget(ones, analysis, 0.5, seed=0)
    assert a.widths == b.widths  # ties are broken by a seeded permutation
    assert within_budget(a, 0.5, tolerance=0.05)
    rounded = threshold_for_budget(ones, analysis, 0.5, round_to=4)
    assert all(w % 4 == 0 for w in rounded.widths.values())
    assert rounded.flops_ratio <= 0.5 + 1e-3


@pytest.mark.parametrize(
    ("name", "options", "shape"),
    [("vgg11", {}, (1, 28, 28)), ("resnet20", {"width": 8}, (3, 16, 16))],
)
def test_baselines_meet_the_budget(name, options, shape):
    model = models.create(name, in_channels=shape[0], input_size=shape[1:], **options)
    with torch.no_grad():  # a "trained" network: BatchNorm scales spread out
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0, 1)
    analysis = analyse(model, shape)
    for budget in (0.5, 0.3):
        structures = {
            "uniform": uniform_structure(analysis, budget),
            "slimming": slimming_structure(analysis, budget),
            "l1 global": l1_filter_structure(analysis, budget),
            "l1 layer": l1_filter_structure(analysis, budget, scope="layer"),
        }
        for label, structure in structures.items():
            assert within_budget(structure, budget), label
        ratios = structures["uniform"].kept_ratios()
        assert max(ratios.values()) - min(ratios.values()) < 0.1
        if name == "resnet20":
            assert all(k.endswith("conv1") and k != "conv1" for k in structures["l1 global"].masks)


def test_l1_layer_scope_keeps_the_largest_filters():
    model = models.create("vgg11", **SMALL_VGG)
    structure = l1_filter_structure(model, 0.5, (1, 28, 28), scope="layer")
    for name, mask in structure.masks.items():
        norms = model.get_submodule(name).weight.abs().flatten(1).sum(1)
        assert norms[mask].min() >= norms[~mask].max()


def test_network_slimming_penalty_and_training(data):
    model = models.create_for("vgg11", data, **SMALL_VGG)
    penalty = bn_l1(1e-2)
    gammas = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    expected = 1e-2 * sum(float(g.detach().abs().sum()) for g in gammas)
    assert float(penalty(model).detach()) == pytest.approx(expected)
    config = winnow.TrainConfig(iterations=3, batch_size=32)
    structure, trained, result = network_slimming(model, data, 0.5, config, strength=1e-2)
    assert within_budget(structure, 0.5, tolerance=0.05)
    assert result.iterations == 3
    assert not torch.equal(trained.features[1].weight, model.features[1].weight)


def test_scratch_b_epochs():
    assert scratch_b_epochs(160, 3.0e8, 1.5e8) == 320
    assert scratch_b_epochs(10, 100, 100) == 10


def test_prune_from_scratch_end_to_end(data):
    result = prune_from_scratch(
        "vgg11", data, 0.5, seed=0, model_options=SMALL_VGG, iterations=8, batch_size=32
    )
    assert within_budget(result.structure, 0.5, tolerance=0.05)
    assert result.spec["options"]["widths"] == list(result.structure.widths.values())
    fresh = rebuild(result.spec, seed=1)
    assert count(fresh, data.input_shape).flops == result.structure.flops


def test_structure_correlation():
    ratios = {
        "a": {"l1": 0.2, "l2": 0.5, "l3": 0.9},
        "b": {"l1": 0.4, "l2": 1.0, "l3": 1.8},  # a x 2: correlation 1
        "c": {"l1": 0.9, "l2": 0.5, "l3": 0.1},  # reversed: close to -1
        "flat": {"l1": 0.5, "l2": 0.5, "l3": 0.5},  # no variance: undefined
    }
    labels, matrix = structure_correlation(ratios)
    assert labels == ["a", "b", "c", "flat"]
    assert matrix[0, 1] == pytest.approx(1.0)
    assert matrix[0, 2] < -0.9
    assert np.isnan(matrix[3]).all()
    assert np.allclose(matrix[:3, :3], matrix[:3, :3].T)
    within = mean_correlation(labels, matrix, lambda s: s in ("a", "b"))
    assert within == pytest.approx(1.0)
    across = mean_correlation(labels, matrix, lambda s: s == "a", lambda s: s != "a")
    assert across == pytest.approx((1.0 + matrix[0, 2]) / 2)


TINY = dict(
    model="vgg11",
    data="synthetic",
    methods=("scratch", "slimming", "l1-filter", "uniform"),
    budgets=(0.5,),
    seeds=(0,),
    width=0.125,
    train=replace(experiment.ScratchConfig().train, epochs=0.5),
    gate_epochs=1.0,
    data_limit=200,
    latency_batch=8,
    latency_repeats=2,
)


def test_scratch_experiment_runs_resumes_and_reports(tmp_path, monkeypatch):
    configs = experiment.sweep(**TINY)
    assert [c.method for c in configs] == ["dense", "scratch", "slimming", "l1-filter", "uniform"]

    trainings, searches, thresholds = [], [], []
    original_train, original_learn = experiment.train, experiment.learn_gates
    original_threshold = experiment.threshold_for_budget

    def killed_once(*args, **kwargs):  # the sweep dies while training the scratch structure
        trainings.append(1)
        if len(trainings) == 2:
            raise SystemExit(1)
        return original_train(*args, **kwargs)

    def counting(*args, **kwargs):
        searches.append(1)
        return original_learn(*args, **kwargs)

    def counting_thresholds(*args, **kwargs):
        thresholds.append(1)
        return original_threshold(*args, **kwargs)

    monkeypatch.setattr(experiment, "train", killed_once)
    monkeypatch.setattr(experiment, "learn_gates", counting)
    monkeypatch.setattr(experiment, "threshold_for_budget", counting_thresholds)
    with pytest.raises(SystemExit):
        experiment.run(tmp_path, configs, progress=False)
    store = RunStore(tmp_path)
    assert [r["status"] for r in store.runs("scratch")] == ["done", "interrupted"]
    experiment.run(tmp_path, configs, progress=False)
    assert len(searches) == len(thresholds) == 1  # the interrupted run reused its structure
    rows = store.records("scratch", kind="result")
    assert len(rows) == len(configs)
    for row in rows:
        assert 0 <= row["test_acc"] <= 1
        assert row["latency_ms"] > 0
        if row["method"] != "dense":
            assert within_budget_ratio(row["flops_ratio"], row["budget"])
            assert row["epochs_trained"] == pytest.approx(0.5 / row["flops_ratio"])
    pretrained = store.runs("scratch-pretrained")  # a run of its own, shared by three methods
    assert [r["status"] for r in pretrained] == ["done", "done"]  # without and with slimming
    assert (
        tmp_path / "scratch-pretrained" / pretrained[0]["run_id"] / "weights.safetensors"
    ).is_file()

    paths = experiment.report(tmp_path)
    table = paths["table"].read_text()
    for method in ("dense", "scratch", "slimming", "l1-filter", "uniform"):
        assert f"| {method} |" in table
    assert paths["correlation 50%"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "within method" in paths["structures"].read_text()

    # the command line finds the same runs done and only reports
    calls_before = len(trainings)
    args = ["experiment", "scratch", "--data", "synthetic", "--width", "0.125", "--epochs", "0.5"]
    args += ["--gate-epochs", "1", "--data-limit", "200", "--budgets", "50%", "--seeds", "0"]
    args += ["--latency-batch", "8", "--latency-repeats", "2"]
    assert cli_main([*args, "--results", str(tmp_path), "--no-progress"]) == 0
    assert len(trainings) == calls_before
    assert cli_main(["experiment", "report", "scratch", "--results", str(tmp_path)]) == 0


def test_gates_of_a_seed_serve_every_budget(tmp_path, monkeypatch):
    configs = experiment.sweep(**{**TINY, "methods": ("scratch",), "budgets": (0.5, 0.3)})
    configs = [c for c in configs if c.method == "scratch"]
    searches = []
    original = experiment.learn_gates

    def counting(*args, **kwargs):
        searches.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(experiment, "learn_gates", counting)
    experiment.run(tmp_path, configs, progress=False)
    assert len(searches) == 1
    rows = RunStore(tmp_path).records("scratch", kind="structure")
    assert [r["gate_chosen"] for r in rows][0] == rows[1]["gate_chosen"]
    assert rows[0]["search_seconds"] > 0 and rows[1]["search_seconds"] > 0


def within_budget_ratio(ratio, budget):
    return budget - 0.1 <= ratio <= budget + 1e-3  # a tiny network has coarse FLOPs steps


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        experiment.ScratchConfig(method="magic")
    with pytest.raises(ValueError, match="budget"):
        experiment.ScratchConfig(budget=1.5)
    with pytest.raises(ValueError, match="dense"):
        experiment.ScratchConfig(method="dense", budget=0.5)
    with pytest.raises(ValueError, match="width"):
        experiment.ScratchConfig(model="lenet5", width=0.5)
    assert experiment.ScratchConfig(model="resnet20", width=0.5).model_options() == {"width": 8}
    assert math.isclose(experiment.ScratchConfig().budget, 0.5)
