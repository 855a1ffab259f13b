"""Sparse variational dropout: the KL approximation, the layers' training and eval passes,
conversion to and from SVDO layers, and a short training that sparsifies."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import winnow
from winnow import models
from winnow.variational import (
    Conv2dSVDO,
    KLPenalty,
    LinearSVDO,
    from_svdo,
    kl,
    neg_kl,
    svdo_layers,
    to_svdo,
)

EULER_GAMMA = 0.5772156649015329


pytestmark = pytest.mark.usefixtures("one_thread")


def exact_neg_kl_plus_constant(log_alpha: float) -> float:
    """0.5·log α − E_{ε ~ N(1, α)} log|ε| (Molchanov et al. 2017, Eq. 13, without its C).

    ε²/α is non-central χ² with 1 degree of freedom and non-centrality λ = 1/α, a Poisson(λ/2)
    mixture of central χ²_{1+2j}, whose E[log] is log 2 + ψ(1/2 + j).
    """
    lam = math.exp(-log_alpha)
    j = torch.arange(0, 3000, dtype=torch.float64)
    log_weights = -lam / 2 + j * math.log(lam / 2) - torch.lgamma(j + 1)
    series = float((log_weights.exp() * torch.special.digamma(j + 0.5)).sum())
    expected_log_abs = 0.5 * (log_alpha + math.log(2) + series)
    return 0.5 * log_alpha - expected_log_abs


def paper_formula(log_alpha: float) -> float:
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    alpha = math.exp(log_alpha)
    return k1 / (1 + math.exp(-(k2 + k3 * log_alpha))) - 0.5 * math.log1p(1 / alpha) - k1


# --- the KL approximation ---------------------------------------------------------------------


def test_neg_kl_uses_the_papers_constants():
    points = [-6.0, -2.5, -1.0, 0.0, 0.7, 3.0, 5.0, 8.0]
    got = neg_kl(torch.tensor(points, dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([paper_formula(p) for p in points]).double())


def test_neg_kl_is_close_to_the_true_kl_for_the_log_uniform_prior():
    # the true −KL is known up to a constant C; the paper takes C = −k1, which is the limit
    # of 0.5·log α − E log|ε| as α → ∞: 0.5·(γ_Euler + log 2) = 0.63518
    assert 0.5 * (EULER_GAMMA + math.log(2)) == pytest.approx(0.63576, abs=1e-3)
    for log_alpha in [-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0]:
        approx = float(neg_kl(torch.tensor(log_alpha, dtype=torch.float64)))
        exact = exact_neg_kl_plus_constant(log_alpha) - 0.63576
        assert approx == pytest.approx(exact, abs=0.01), log_alpha
    # and the series itself against a Monte-Carlo estimate of E log|ε|
    generator = torch.Generator().manual_seed(0)
    eps = 1 + math.exp(0.5) * torch.randn(200_000, generator=generator, dtype=torch.float64)
    monte_carlo = 0.5 * 1.0 - float(eps.abs().log().mean())
    assert exact_neg_kl_plus_constant(1.0) == pytest.approx(monte_carlo, abs=0.01)


def test_neg_kl_limits_and_monotonicity():
    grid = torch.linspace(-20, 20, 401, dtype=torch.float64)
    values = neg_kl(grid)
    assert (values.diff() > 0).all()  # −KL increases with the dropout rate
    assert (values < 0).all()
    assert float(neg_kl(torch.tensor(40.0, dtype=torch.float64))) == pytest.approx(0, abs=1e-9)
    # as α → 0: −KL ≈ 0.5·log α + const → −∞, with slope 0.5
    low = neg_kl(torch.tensor([-41.0, -40.0], dtype=torch.float64))
    assert float(low[1] - low[0]) == pytest.approx(0.5, abs=1e-9)
    assert float(low[1]) < -19


def test_kl_sums_the_layers_and_its_gradient_matches_the_closed_form():
    model = to_svdo(
        models.create("mlp", input_size=3, num_classes=2, hidden=[4]), log_sigma2_init=-3
    )
    layers = svdo_layers(model)
    expected = sum(float(-neg_kl(layer.log_alpha().detach()).sum()) for layer in layers.values())
    value = kl(model)
    assert value.item() == pytest.approx(expected)
    value.backward()
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    for layer in layers.values():
        log_alpha = layer.log_alpha().detach()
        inside = log_alpha.abs() < 8  # the clip has zero gradient
        s = torch.sigmoid(k2 + k3 * log_alpha)
        d_neg_kl = k1 * k3 * s * (1 - s) + 0.5 * torch.sigmoid(-log_alpha)
        torch.testing.assert_close(layer.log_sigma2.grad, torch.where(inside, -d_neg_kl, 0.0))


def test_kl_penalty_scale_and_warmup():
    model = to_svdo(models.create("mlp", input_size=3, num_classes=2, hidden=[4]))
    total = float(kl(model).detach())
    penalty = KLPenalty(0.01, warmup=4)
    values = [float(penalty(model).detach()) for _ in range(6)]
    factors = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert values == pytest.approx([0.01 * f * total for f in factors])
    assert penalty.step == 6 and "warmup=4" in repr(penalty)
    penalty.reset()
    assert float(penalty(model).detach()) == pytest.approx(0.0025 * total)
    assert float(KLPenalty(0.5)(model).detach()) == pytest.approx(0.5 * total)
    with pytest.raises(ValueError, match="weight"):
        KLPenalty(-1.0)
    with pytest.raises(ValueError, match="warmup"):
        KLPenalty(1.0, warmup=-2)
    with pytest.raises(ValueError, match="no SVDO layer"):
        kl(models.create("mlp", input_size=3, num_classes=2, hidden=[4]))


# --- the layers -------------------------------------------------------------------------------


def conv_model(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(4, 5, (3, 2), padding=1, bias=False, padding_mode="reflect"),
            nn.Flatten(),
            nn.Linear(5 * 5 * 6, 3, bias=False),
        )


def test_to_svdo_with_tiny_variance_reproduces_the_model_in_eval():
    model = conv_model().eval()
    converted = to_svdo(model, log_sigma2_init=-60.0)
    assert [type(m) for m in converted if not isinstance(m, (nn.ReLU, nn.Flatten))] == [
        Conv2dSVDO,
        Conv2dSVDO,
        LinearSVDO,
    ]
    assert type(model[0]) is nn.Conv2d  # the model given is unchanged
    assert converted[2].padding_mode == "reflect" and converted[0].dilation == (2, 2)
    x = torch.randn(2, 3, 9, 10)
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-6)
    lenet = models.create("lenet5", input_size=16).eval()
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(
        to_svdo(lenet, log_sigma2_init=-60.0)(x), lenet(x), rtol=0, atol=1e-6
    )


def test_to_svdo_state_dict_and_names():
    model = conv_model()
    converted = to_svdo(model, names=["0", "4"])
    assert type(converted[2]) is nn.Conv2d  # not named: left as it was
    keys = set(converted.state_dict())
    assert keys == set(model.state_dict()) | {"0.log_sigma2", "4.log_sigma2"}
    assert (converted[0].log_sigma2.detach() == -10.0).all()
    again = to_svdo(conv_model(seed=1), names=["0", "4"])
    again.load_state_dict(converted.state_dict())
    assert torch.equal(again[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        to_svdo(model, names=["nope"])
    with pytest.raises(ValueError, match="ReLU, not a Linear or Conv2d"):
        to_svdo(model, names=["1"])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_training_pass_samples_the_local_reparameterisation(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer = LinearSVDO(6, 3, log_sigma2_init=-2.0)
        x = torch.randn(1, 6).expand(40_000, 6)
        mean = F.linear(x[:1], layer.weight, layer.bias)
        var = F.linear(x[:1].square(), layer.log_sigma2.exp())
    else:
        layer = Conv2dSVDO(2, 3, 3, stride=2, padding=1, log_sigma2_init=-2.0)
        x = torch.randn(1, 2, 5, 5).expand(40_000, 2, 5, 5)
        mean = F.conv2d(x[:1], layer.weight, layer.bias, stride=2, padding=1)
        var = F.conv2d(x[:1].square(), layer.log_sigma2.exp(), stride=2, padding=1)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        samples = layer.train()(x)
    torch.testing.assert_close(samples.mean(0), mean[0].detach(), rtol=0, atol=0.03)
    ratio = samples.var(0) / (var[0].detach() + 1e-8)
    assert (ratio - 1).abs().max() < 0.06  # 40,000 samples: relative error of var ~ 0.7%
    deterministic = layer.eval()(x[:1])
    assert torch.equal(deterministic, layer.eval()(x[:1]))


def test_eval_pass_and_from_svdo_prune_exactly_log_alpha_above_three():
    model = to_svdo(conv_model())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in svdo_layers(model).values():
            layer.log_sigma2.copy_(
                torch.log(layer.weight.square())
                + 6 * torch.rand(layer.weight.shape, generator=generator)
            )
    model.eval()
    expected = {
        f"{n}.weight": layer.log_alpha().detach() <= 3 for n, layer in svdo_layers(model).items()
    }
    plain, masks = from_svdo(model)
    assert list(masks) == list(expected)
    for name, keep in expected.items():
        assert torch.equal(masks[name], keep)
        assert 0.2 < keep.double().mean() < 0.8
    params = dict(plain.named_parameters())
    assert set(masks) <= set(params)
    for name, keep in masks.items():
        original = dict(model.named_parameters())[name].detach()
        assert torch.equal(params[name].detach(), original * keep)  # exactly those zeroed
    assert [type(m) for m in plain] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Flatten, nn.Linear]
    assert plain[2].padding_mode == "reflect" and plain[2].bias is None
    assert set(plain.state_dict()) == set(conv_model().state_dict())
    x = torch.randn(4, 3, 9, 10)
    assert torch.equal(plain.eval()(x), model(x))
    with pytest.raises(ValueError, match="no SVDO layer"):
        from_svdo(plain)


def test_training_with_the_kl_sparsifies():
    data = winnow.data.load("synthetic", n_train=256, n_test=128, seed=0)
    model = to_svdo(models.create("mlp", in_channels=1, input_size=8, num_classes=4, hidden=[32]))

    def pruned(m):
        return sum(int((layer.log_alpha() > 3).sum()) for layer in svdo_layers(m).values())

    start = pruned(model)
    config = winnow.TrainConfig(iterations=100, lr=1e-2, batch_size=32, eval_every=100)
    result = winnow.train(model, data, config, regularizer=KLPenalty(1 / len(data.x_train)))
    after = pruned(model)
    assert after > 10 * max(start, 1)  # about 2,000 of 2,180 weights, from about 20
    plain, masks = from_svdo(model)
    assert masks.num_kept() == masks.numel() - after
    accuracy = winnow.evaluate(plain, data.x_test, data.y_test)[1]
    assert accuracy == pytest.approx(result.final["test_acc"])
    assert accuracy > 0.5
