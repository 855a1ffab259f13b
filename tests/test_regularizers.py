"""Regularisers: values and gradients against closed forms and finite differences, zero
weights, thresholding to a density, the L0 and learned-threshold wrappers, validation."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import winnow
from winnow import models, select
from winnow.regularizers import (
    L1,
    GroupLasso,
    HardConcreteGate,
    Hoyer,
    L0Gates,
    L0HardConcrete,
    LearnedThreshold,
    Polarization,
    pruning_function,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0, dtype=torch.float64):
    model = models.create("mlp", in_channels=1, input_size=3, num_classes=3, hidden=[4], seed=seed)
    return model.to(dtype)


def convnet(seed=0, dtype=torch.float64):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 3, 3),
            nn.BatchNorm2d(3),
            nn.Flatten(),
            nn.Linear(3 * 2 * 2, 5),
        )
        for bn in (model[1], model[4]):
            nn.init.uniform_(bn.weight, -1, 1)
    return model.to(dtype)


@pytest.fixture(scope="module")
def data():
    return winnow.data.load("synthetic", n_train=256, n_test=128, seed=0)


def grads(reg, model):
    model.zero_grad(set_to_none=True)
    value = reg(model)
    value.backward()
    return value, {n: p.grad for n, p in model.named_parameters()}


def weights(model):
    return {n: p.detach() for n, p in winnow.prunable_parameters(model).items()}


# --- values and gradients against closed forms ------------------------------------------------


def test_l1_value_and_gradient():
    model, lam = mlp(), 0.3
    value, g = grads(L1(lam), model)
    w = weights(model)
    assert value.item() == pytest.approx(lam * sum(float(t.abs().sum()) for t in w.values()))
    for name, t in w.items():
        torch.testing.assert_close(g[name], lam * t.sign())
    assert g["layers.1.bias"] is None  # biases are not penalised


def test_hoyer_value_and_gradient_are_per_layer_sums():
    model, lam = convnet(), 0.7
    value, g = grads(Hoyer(lam), model)
    expected = 0.0
    for name, t in weights(model).items():
        l1, l2sq = t.abs().sum(), t.square().sum()
        expected += float(l1**2 / l2sq)
        # d/dθ (‖θ‖₁² / ‖θ‖₂²) = 2‖θ‖₁ sign(θ) / ‖θ‖₂² − 2‖θ‖₁² θ / ‖θ‖₂⁴
        closed = 2 * l1 * t.sign() / l2sq - 2 * l1**2 * t / l2sq**2
        torch.testing.assert_close(g[name], lam * closed)
    assert value.item() == pytest.approx(lam * expected)


@pytest.mark.parametrize("group,axis", [("filter", 0), ("neuron", 0), ("channel", 1)])
@pytest.mark.parametrize("weighted", [True, False])
def test_group_lasso_value_and_gradient(group, axis, weighted):
    model, lam = convnet(), 0.5
    value, g = grads(GroupLasso(lam, group, weighted=weighted), model)
    expected = 0.0
    for name, t in weights(model).items():
        closed = torch.zeros_like(t)
        for i in range(t.shape[axis]):
            slice_ = t.select(axis, i)
            w = math.sqrt(slice_.numel()) if weighted else 1.0
            norm = float(slice_.norm())
            expected += w * norm
            closed.select(axis, i).copy_(w * slice_ / norm)
        torch.testing.assert_close(g[name], lam * closed)
    assert value.item() == pytest.approx(lam * expected)


def test_polarization_value_and_gradient_global_and_per_layer():
    model, lam, t = convnet(), 0.2, 1.2
    gammas = {"1.weight": model[1].weight.detach(), "4.weight": model[4].weight.detach()}
    value, g = grads(Polarization(lam, t), model)
    flat = torch.cat(list(gammas.values()))
    assert value.item() == pytest.approx(
        lam * float(t * flat.abs().sum() - (flat - flat.mean()).abs().sum())
    )
    # d/dγ_i [t Σ|γ_j| − Σ|γ_j − γ̄|] = t sign(γ_i) − sign(γ_i − γ̄) + mean_j sign(γ_j − γ̄)
    signs = (flat - flat.mean()).sign()
    closed = lam * (t * flat.sign() - signs + signs.mean())
    torch.testing.assert_close(torch.cat([g["1.weight"], g["4.weight"]]), closed)
    assert g["0.weight"] is None  # convolutions untouched

    value, g = grads(Polarization(lam, t, scope="layer"), model)
    expected = sum(float(t * v.abs().sum() - (v - v.mean()).abs().sum()) for v in gammas.values())
    assert value.item() == pytest.approx(lam * expected)
    for name, v in gammas.items():
        s = (v - v.mean()).sign()
        torch.testing.assert_close(g[name], lam * (t * v.sign() - s + s.mean()))


@pytest.mark.parametrize(
    "reg",
    [
        L1(0.3),
        Hoyer(0.3),
        GroupLasso(0.3, "filter"),
        GroupLasso(0.3, "channel", weighted=False),
        Polarization(0.3, names=["1.weight", "4.weight"]),
        Polarization(0.3, scope="layer"),
    ],
    ids=repr,
)
def test_gradient_matches_finite_differences(reg):
    model = convnet()
    params = reg.parameters(model)
    names, tensors = list(params), [p.detach().clone().requires_grad_() for p in params.values()]

    def penalty(*ts):
        return reg.strength * reg.penalty(dict(zip(names, ts, strict=True)))

    assert torch.autograd.gradcheck(penalty, tensors, eps=1e-6, atol=1e-5)


# --- zero weights -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reg",
    [L1(1.0), Hoyer(1.0), GroupLasso(1.0, "filter"), GroupLasso(1.0, "channel")],
    ids=repr,
)
def test_zero_weights_give_finite_gradients(reg):
    model = convnet()
    with torch.no_grad():
        model[0].weight.zero_()  # a whole layer at zero
        model[3].weight[1].zero_()  # one filter at zero
        model[3].weight[:, 2].zero_()  # one channel at zero
        model[6].weight[0, 0] = 0.0  # a single weight
    value, g = grads(reg, model)
    assert torch.isfinite(value)
    for name in reg.parameters(model):
        assert torch.isfinite(g[name]).all(), name
    assert (g["0.weight"] == 0).all()  # subgradient 0 where the layer (or its groups) vanish
    if isinstance(reg, GroupLasso):
        index = (1,) if reg.group == "filter" else (slice(None), 2)
        assert (g["3.weight"][index] == 0).all()


def test_polarization_at_zero_is_finite():
    model = convnet()
    with torch.no_grad():
        model[1].weight.zero_()
    value, g = grads(Polarization(1.0), model)
    assert torch.isfinite(value) and torch.isfinite(g["1.weight"]).all()


# --- thresholding to a density ----------------------------------------------------------------


@pytest.mark.parametrize(
    "reg",
    [L1(1e-3), Hoyer(1e-3), GroupLasso(1e-3, "filter"), GroupLasso(1e-3, "channel")],
    ids=repr,
)
@pytest.mark.parametrize("density", [0.1, 0.37])
def test_thresholding_gives_the_requested_density(reg, density):
    model = models.create("lenet5", input_size=16, seed=1)
    scores = reg.scores(model)
    assert set(scores) == set(winnow.prunable_parameters(model))
    masks = select(scores, density)
    assert masks.num_kept() == round(density * masks.numel())
    assert select(scores, density, scope="layer").num_kept() == sum(
        round(density * s.numel()) for s in scores.values()
    )


@pytest.mark.parametrize("group,axis", [("filter", 0), ("neuron", 0), ("channel", 1)])
def test_group_lasso_scores_are_constant_within_groups_and_remove_whole_groups(group, axis):
    model = models.create("lenet5", input_size=16, seed=1)
    reg = GroupLasso(1e-3, group)
    scores = reg.scores(model)
    for name, s in scores.items():
        first = s.select(axis, 0).flatten()[0]
        assert (s.select(axis, 0) == first).all()
        spread = s.movedim(axis, 0).flatten(1)
        assert (spread == spread[:, :1]).all(), name
    groups = {n: s.shape[axis] for n, s in scores.items()}
    density = {n: (g // 2) / g for n, g in groups.items()}  # half the groups of each layer
    masks = select(scores, density)
    for name, mask in masks.items():
        per_group = mask.movedim(axis, 0).flatten(1)
        assert (per_group.all(1) | ~per_group.any(1)).all(), name  # whole groups only
        assert int(per_group.all(1).sum()) == groups[name] // 2


def test_polarization_scores_are_per_channel():
    model = convnet()
    scores = Polarization(1e-4).scores(model)
    assert list(scores) == ["1.weight", "4.weight"]
    torch.testing.assert_close(scores["1.weight"], model[1].weight.detach().abs())
    masks = select(scores, 3 / 7)
    assert masks.num_kept() == 3


def test_l1_training_sparsifies(data):
    model = models.create("mlp", in_channels=1, input_size=8, num_classes=4, hidden=[32])
    start = sum(int((p.abs() < 1e-2).sum()) for p in weights(model).values())
    config = winnow.TrainConfig(iterations=100, lr=1e-2, batch_size=32, eval_every=100)
    result = winnow.train(model, data, config, regularizer=L1(1e-2))
    small = sum(int((p.abs() < 1e-2).sum()) for p in weights(model).values())
    assert small > 5 * start  # about 1,700 of 2,180 weights, from about 120 (and 100 at λ = 0)
    assert result.final["test_acc"] > 0.7


# --- validation and repr ----------------------------------------------------------------------


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="strength"):
        L1(-1.0)
    with pytest.raises(ValueError, match="strength"):
        Hoyer(float("nan"))
    with pytest.raises(ValueError, match="unknown group 'row'"):
        GroupLasso(1.0, "row")
    with pytest.raises(ValueError, match="t must be"):
        Polarization(1.0, t=0.0)
    with pytest.raises(ValueError, match="unknown scope"):
        Polarization(1.0, scope="model")
    with pytest.raises(ValueError, match="no affine BatchNorm"):
        Polarization(1.0)(mlp())
    with pytest.raises(ValueError, match="1-D scaling factors"):
        Polarization(1.0, names=["layers.1.weight"])(mlp())
    with pytest.raises(ValueError, match="no parameter named 'nope'"):
        L1(1.0, names=["nope"])(mlp())
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        GroupLasso(1.0, names=["layers.1.bias"])(mlp())
    with pytest.raises(ValueError, match="strength"):
        L0HardConcrete(-0.1)
    with pytest.raises(ValueError, match="init_drop"):
        L0HardConcrete.attach(mlp(), init_drop=1.0)
    with pytest.raises(ValueError, match="no HardConcreteGate gates"):
        L0HardConcrete()(mlp())
    with pytest.raises(ValueError, match="sharpness"):
        LearnedThreshold.attach(mlp(), sharpness=0.0)


def test_reprs_name_the_settings():
    assert repr(L1(0.001)) == "L1(strength=0.001)"
    assert repr(GroupLasso(0.1, "channel", names=["a.weight"])) == (
        "GroupLasso(strength=0.1, group='channel', weighted=True, names=['a.weight'])"
    )
    assert repr(Polarization(1e-4)) == "Polarization(strength=0.0001, t=1.2, scope='global')"
    assert repr(L0HardConcrete(0.5, normalize=False)) == (
        "L0HardConcrete(strength=0.5, normalize=False)"
    )
    assert repr(LearnedThreshold(0.01)) == "LearnedThreshold(strength=0.01)"


def test_only_the_named_parameters_are_penalised():
    model = mlp()
    _, g = grads(L1(1.0, names=["layers.3.weight"]), model)
    assert g["layers.1.weight"] is None and g["layers.3.weight"] is not None


# --- L0 with hard-concrete gates --------------------------------------------------------------


def test_l0_gate_formulas():
    gate = HardConcreteGate((5000,), 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-4, 4, 5000))
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    log_alpha = gate.log_alpha.detach()
    expected_test = (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0, 1)
    torch.testing.assert_close(gate.test_gate(), expected_test)
    # the training sample, from the same uniforms
    u = torch.rand(5000, generator=torch.Generator().manual_seed(7))
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / beta)
    expected_sample = torch.minimum(torch.ones(()), torch.maximum(torch.zeros(()), s * 1.2 - 0.1))
    torch.testing.assert_close(
        gate.sample(torch.Generator().manual_seed(7)).detach(), expected_sample
    )
    # P(z != 0) in closed form, against a Monte-Carlo estimate
    closed = torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))
    torch.testing.assert_close(gate.prob_nonzero().detach(), closed)
    generator = torch.Generator().manual_seed(1)
    nonzero = torch.stack([gate.sample(generator).detach() > 0 for _ in range(400)]).double()
    assert (nonzero.mean(0) - closed).abs().max() < 0.1  # 4.3 standard errors at most
    assert abs(float(nonzero.mean()) - float(closed.mean())) < 0.005
    assert float(gate.expected_l0().detach()) == pytest.approx(float(closed.sum()))


def test_l0_penalty_value_and_gradient():
    model = mlp()
    gated, reg = L0HardConcrete.attach(model, strength=0.3, normalize=False, seed=2)
    gates = L0HardConcrete.gates(gated)
    assert list(gates) == ["layers.1.weight", "layers.3.weight"]
    value = reg(gated)
    value.backward()
    shift = (2 / 3) * math.log(0.1 / 1.1)
    total = 0.0
    for gate in gates.values():
        p = torch.sigmoid(gate.log_alpha.detach() - shift)
        total += float(p.sum())
        torch.testing.assert_close(gate.log_alpha.grad, 0.3 * p * (1 - p))
    assert value.item() == pytest.approx(0.3 * total)
    n = sum(w.numel() for w in weights(model).values())
    normalized = L0HardConcrete(0.3, normalize=True)(gated)
    assert normalized.item() == pytest.approx(0.3 * total / n)
    # init_drop: log α ≈ log(1 − p) − log p
    mean = torch.cat([g.log_alpha.detach().flatten() for g in gates.values()]).mean()
    assert float(mean) == pytest.approx(0.0, abs=0.01)


def test_l0_attach_trains_round_trips_and_finalizes():
    data = winnow.data.load("synthetic", n_train=128, n_test=32, input_shape=(1, 12, 12))
    model = models.create("lenet5", in_channels=1, input_size=12, num_classes=4, seed=0)
    gated, reg = L0Gates.attach(model, init_drop=0.3, seed=0, strength=0.5)
    assert not parametrize.is_parametrized(model.features[0])  # the original is untouched
    config = winnow.TrainConfig(iterations=10, lr=5e-2, batch_size=32, eval_every=10)
    winnow.train(gated, data, config, regularizer=reg)
    with torch.no_grad():  # make some gates close, so that finalize prunes
        gate = L0HardConcrete.gates(gated)["classifier.1.weight"]
        gate.log_alpha[:, :5] = -6.0
        masks_before = gate.test_gate() > 0
    keys = gated.state_dict().keys()
    assert "features.0.parametrizations.weight.original" in keys
    assert "features.0.parametrizations.weight.0.log_alpha" in keys
    again, _ = L0HardConcrete.attach(model)
    again.load_state_dict(gated.state_dict())

    x = data.x_test[:16]
    gated.eval()
    again.eval()
    expected = gated(x)
    assert torch.equal(again(x), expected)
    plain, masks = L0HardConcrete.finalize(gated)
    plain.eval()
    assert type(plain.features[0]) is nn.Conv2d  # gates removed
    assert set(plain.state_dict()) == set(model.state_dict())
    assert torch.equal(plain(x), expected)
    assert set(masks) == set(winnow.prunable_parameters(plain))
    assert torch.equal(masks["classifier.1.weight"], masks_before)
    assert (plain.classifier[1].weight[~masks["classifier.1.weight"]] == 0).all()
    assert masks.density() < 1.0


def test_l0_group_gates_and_scores():
    model = mlp()
    gated, reg = L0HardConcrete.attach(model, group="neuron", seed=3)
    gates = L0HardConcrete.gates(gated)
    assert gates["layers.1.weight"].log_alpha.shape == (4, 1)
    assert gates["layers.1.weight"].group_size == 9
    scores = reg.scores(gated)
    assert scores["layers.1.weight"].shape == (4, 9)
    assert (scores["layers.1.weight"] == scores["layers.1.weight"][:, :1]).all()
    masks = select(scores, {"layers.1.weight": 0.5, "layers.3.weight": 1.0})
    rows = masks["layers.1.weight"]
    assert (rows.all(1) | ~rows.any(1)).all() and int(rows.all(1).sum()) == 2
    with torch.no_grad():
        expected = 9 * float(gates["layers.1.weight"].prob_nonzero().sum())
        expected += 4 * float(gates["layers.3.weight"].prob_nonzero().sum())
    assert reg(gated).item() == pytest.approx(0.1 * expected / (36 + 12))


# --- learned threshold ------------------------------------------------------------------------


def test_pruning_function_equals_the_formula():
    theta = torch.linspace(-0.3, 0.3, 61, dtype=torch.float64)
    t, alpha = 0.1, 50.0

    def sigmoid(v):
        return 1 / (1 + math.exp(-v))

    expected = [
        max(v - t, 0)
        + t * sigmoid(alpha * (v - t))
        - max(-v - t, 0)
        - t * sigmoid(alpha * (-v - t))
        for v in theta.tolist()
    ]
    torch.testing.assert_close(pruning_function(theta, t, alpha), torch.tensor(expected).double())
    away = (theta.abs() - t).abs() > 1e-3  # at |θ| = t exactly the function is t/2
    hard = pruning_function(theta, t, 1e6)[away]
    torch.testing.assert_close(hard, (theta * (theta.abs() > t))[away], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        pruning_function(-theta, t, alpha), -pruning_function(theta, t, alpha)
    )


def test_pruning_function_gradient_matches_finite_differences():
    theta = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theta.requires_grad_()
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: pruning_function(a, b, 8.0), (theta, t))


def test_learned_threshold_penalty_finalize_and_scores():
    model = mlp()
    gated, reg = LearnedThreshold.attach(model, strength=0.2, init_threshold=0.3, sharpness=40.0)
    prunes = LearnedThreshold.thresholds(gated)
    assert float(prunes["layers.1.weight"].threshold().detach()) == pytest.approx(0.3)
    with torch.no_grad():
        prunes["layers.3.weight"].raw_threshold.fill_(-1.0)
    value = reg(gated)
    value.backward()
    thresholds = {n: p.threshold().detach() for n, p in prunes.items()}
    assert value.item() == pytest.approx(-0.2 * float(sum(thresholds.values())))
    for p in prunes.values():  # d(−λ softplus(ρ))/dρ = −λ σ(ρ)
        torch.testing.assert_close(p.raw_threshold.grad, -0.2 * torch.sigmoid(p.raw_threshold))

    x = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    w = weights(model)
    soft = gated.layers[1].weight
    torch.testing.assert_close(soft, pruning_function(w["layers.1.weight"], 0.3, 40.0))

    plain, masks = LearnedThreshold.finalize(gated)
    for name, theta in w.items():
        pruned = theta.abs() <= thresholds[name]
        assert torch.equal(masks[name], ~pruned)  # exactly |θ| <= t is pruned
        assert torch.equal(dict(plain.named_parameters())[name].detach(), theta * ~pruned)
    assert 0 < masks.density() < 1
    assert type(plain.layers[1]) is nn.Linear
    assert plain(x).shape == (5, 3)
    scores = reg.scores(gated)
    for name in w:
        assert torch.equal(scores[name] > 0, masks[name])
    assert select(scores, masks.density()) == masks


def test_learned_threshold_trains(data):
    model = models.create("mlp", in_channels=1, input_size=8, num_classes=4, hidden=[16])
    gated, reg = LearnedThreshold.attach(model, strength=1.0, init_threshold=0.02, sharpness=200)
    before = {
        n: float(p.threshold().detach()) for n, p in LearnedThreshold.thresholds(gated).items()
    }
    config = winnow.TrainConfig(iterations=20, lr=1e-2, batch_size=32, eval_every=20)
    winnow.train(gated, data, config, regularizer=reg)
    after = {
        n: float(p.threshold().detach()) for n, p in LearnedThreshold.thresholds(gated).items()
    }
    assert all(after[n] > before[n] for n in before)
