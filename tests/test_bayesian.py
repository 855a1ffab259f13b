"""Structured Bayesian pruning: the truncated log-normal's KL, moments, SNR and sampler against
numerical integration and Monte Carlo, the layers' training and eval passes, conversion to and
from SBP layers, and a short training that removes neurons."""

import math

import pytest
import torch
from torch import nn

import winnow
from winnow import models
from winnow.bayesian import (
    Conv2dSBP,
    LinearSBP,
    LogNormalNoise,
    SBPPenalty,
    from_sbp,
    kl,
    log_ndtr_diff,
    sample_log_truncated,
    sbp_layers,
    snr,
    to_sbp,
    truncated_kl,
    truncated_mean,
    truncated_snr,
    truncated_variance,
)

pytestmark = pytest.mark.usefixtures("one_thread")

A, B = -20.0, 0.0
CASES = [(0.0, 0.01), (0.0, 1.0), (-3.0, 2.0), (-10.0, 5.0), (-5.0, 0.1), (-19.0, 0.5),
         (-10.0, 148.0), (2.0, 1.0), (-25.0, 3.0)]  # fmt: skip


def quadrature(mu: float, sigma: float, n: int = 400_001) -> dict[str, float]:
    """KL to the truncated log-uniform, E[θ], Var[θ] and SNR by the trapezoidal rule over
    log θ ∈ [a, b], from the density of N(μ, σ²) normalised on the grid (no Φ involved)."""
    x = torch.linspace(A, B, n, dtype=torch.float64)
    density = torch.exp(-0.5 * ((x - mu) / sigma) ** 2)
    density = density / torch.trapezoid(density, x)
    kl_value = torch.trapezoid(density * torch.log(density.clamp_min(1e-300) * (B - A)), x)
    mean = torch.trapezoid(density * x.exp(), x)
    variance = torch.trapezoid(density * (2 * x).exp(), x) - mean**2
    return {
        "kl": float(kl_value),
        "mean": float(mean),
        "variance": float(variance),
        "snr": float(mean / variance.sqrt()),
    }


def t(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


# --- the distribution --------------------------------------------------------------------------


@pytest.mark.parametrize(("mu", "sigma"), CASES)
def test_closed_forms_match_numerical_integration(mu, sigma):
    expected = quadrature(mu, sigma)
    assert float(truncated_kl(t(mu), t(sigma))) == pytest.approx(expected["kl"], rel=1e-6, abs=1e-8)
    assert float(truncated_mean(t(mu), t(sigma))) == pytest.approx(expected["mean"], rel=1e-6)
    assert float(truncated_variance(t(mu), t(sigma))) == pytest.approx(
        expected["variance"], rel=1e-5
    )
    assert float(truncated_snr(t(mu), t(sigma))) == pytest.approx(expected["snr"], rel=1e-5)


def test_the_kl_is_zero_at_the_prior_and_positive_elsewhere():
    # σ → ∞ makes the truncated normal uniform on [a, b]: the prior itself
    assert float(truncated_kl(t(-10.0), t(1e4))) == pytest.approx(0.0, abs=1e-6)
    values = truncated_kl(torch.tensor([0.0, -3.0, -19.0]).double(), torch.tensor([0.1, 2, 5.0]))
    assert (values > 0).all()


def test_log_ndtr_diff_is_accurate_in_both_tails():
    x = torch.tensor([-30.0, -30.0, 0.5, 30.0, 9.0], dtype=torch.float64)
    y = torch.tensor([-31.0, -40.0, -0.5, 29.0, 8.0], dtype=torch.float64)
    # reference: Φ(x) − Φ(y) = ∫_y^x φ, by the trapezoidal rule in log space
    for xi, yi, got in zip(x, y, log_ndtr_diff(x, y), strict=True):
        grid = torch.linspace(float(yi), float(xi), 200_001, dtype=torch.float64)
        log_phi = -0.5 * grid**2 - 0.5 * math.log(2 * math.pi)
        top = log_phi.max()
        expected = top + torch.log(torch.trapezoid((log_phi - top).exp(), grid))
        assert float(got) == pytest.approx(float(expected), rel=1e-8)


@pytest.mark.parametrize(("mu", "sigma"), [(0.0, 0.01), (-3.0, 2.0), (-10.0, 148.0), (-19.0, 0.5)])
def test_samples_match_the_closed_forms(mu, sigma):
    generator = torch.Generator().manual_seed(0)
    n = 400_000
    uniform = torch.rand(n, generator=generator, dtype=torch.float64)
    log_theta = sample_log_truncated(t(mu), t(sigma), A, B, uniform)
    assert log_theta.min() >= A and log_theta.max() <= B
    theta = log_theta.exp()
    assert theta.min() >= math.exp(A) and theta.max() <= math.exp(B)
    mean, variance = (
        float(truncated_mean(t(mu), t(sigma))),
        float(truncated_variance(t(mu), t(sigma))),
    )
    standard_error = math.sqrt(variance / n)
    assert float(theta.mean()) == pytest.approx(mean, abs=5 * standard_error)
    assert float(theta.var()) == pytest.approx(variance, rel=0.02)
    assert float(theta.mean() / theta.std()) == pytest.approx(
        float(truncated_snr(t(mu), t(sigma))), rel=0.02
    )
    # the empirical CDF of log θ against the truncated normal's
    quantiles = torch.quantile(log_theta[:100_000], torch.tensor([0.1, 0.5, 0.9]).double())
    normal = torch.distributions.Normal(torch.tensor(mu).double(), torch.tensor(sigma).double())
    low, high = normal.cdf(torch.tensor(A).double()), normal.cdf(torch.tensor(B).double())
    cdf = (normal.cdf(quantiles) - low) / (high - low)
    torch.testing.assert_close(cdf, torch.tensor([0.1, 0.5, 0.9]).double(), atol=0.01, rtol=0)


def test_everything_is_finite_at_the_corners_of_the_parameter_box():
    noise = LogNormalNoise(4)
    with torch.no_grad():
        noise.mu.copy_(torch.tensor([-50.0, 50.0, -20.0, 0.0]))  # clipped to [a, b]
        noise.log_sigma.copy_(torch.tensor([-30.0, -30.0, 10.0, 10.0]))  # clipped to [-20, 5]
    noise.train()
    out = noise(torch.ones(64, 4))
    total = noise.kl() + noise.snr().sum() + noise.mean().sum() + noise.variance().sum()
    (total + out.sum()).backward()
    for value in (out, noise.kl(), noise.snr(), noise.mean(), noise.variance()):
        assert torch.isfinite(value).all()
    assert torch.isfinite(noise.mu.grad).all() and torch.isfinite(noise.log_sigma.grad).all()
    assert (out >= math.exp(A)).all() and (out <= 1).all()


# --- the layers ------------------------------------------------------------------------------


def test_linear_eval_is_the_output_times_the_mean_and_training_samples_per_row():
    torch.manual_seed(0)
    linear = nn.Linear(5, 3)
    layer = LinearSBP.from_linear(linear)
    with torch.no_grad():
        layer.noise.mu.copy_(torch.tensor([0.0, -2.0, -8.0]))
        layer.noise.log_sigma.copy_(torch.tensor([-5.0, 0.0, 1.0]))
    x = torch.randn(7, 2, 5)
    mean = layer.noise.mean().float()
    layer.eval()
    torch.testing.assert_close(layer(x), linear(x) * mean)
    layer.train()
    ratio = layer(x) / linear(x)
    assert (ratio > 0).all() and (ratio <= 1 + 1e-6).all()
    assert ratio[:, :, 2].unique().numel() > 1  # one θ per row (example, token)


def test_conv_noise_is_per_example_and_channel_shared_over_positions():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    layer = Conv2dSBP.from_conv(conv, mu_init=-3.0, log_sigma_init=0.0)
    x = torch.randn(6, 2, 5, 5)
    layer.train()
    ratio = layer(x) / conv(x)
    flat = ratio.flatten(2)
    torch.testing.assert_close(flat, flat[:, :, :1].expand_as(flat), rtol=1e-4, atol=0)
    assert flat[:, 0, 0].unique().numel() == 6  # a θ of its own for each example
    layer.eval()
    torch.testing.assert_close(layer(x), conv(x) * layer.noise.mean().float()[:, None, None])
    torch.testing.assert_close(
        layer(x[0]), conv(x[0]) * layer.noise.mean().float()[:, None, None]
    )  # unbatched
    with pytest.raises(ValueError, match="expected 4 features"):
        layer.noise(torch.randn(2, 3, 5, 5))


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def test_to_sbp_converts_all_but_the_last_layer_and_keeps_names():
    model = mlp()
    converted = to_sbp(model)
    assert list(sbp_layers(converted)) == ["0", "2"]
    assert type(converted[4]) is nn.Linear
    assert set(converted.state_dict()) == set(model.state_dict()) | {
        "0.noise.mu", "0.noise.log_sigma", "2.noise.mu", "2.noise.log_sigma"
    }  # fmt: skip
    assert type(model[0]) is nn.Linear  # unchanged
    assert list(sbp_layers(to_sbp(model, names=["4"]))) == ["4"]
    with pytest.raises(ValueError, match="no module named"):
        to_sbp(model, names=["9"])
    with pytest.raises(ValueError, match="not a Linear or Conv2d"):
        to_sbp(model, names=["1"])
    with pytest.raises(TypeError):
        to_sbp(model, names="0")
    with pytest.raises(ValueError, match="no SBP layer"):
        kl(model)


def test_kl_snr_and_penalty_of_a_model():
    model = to_sbp(mlp())
    layers = sbp_layers(model)
    total = sum(
        float(truncated_kl(*layer.noise.params()).sum().detach()) for layer in layers.values()
    )
    assert float(kl(model).detach()) == pytest.approx(total, rel=1e-6)
    assert kl(model).dtype == torch.float32
    values = snr(model)
    assert list(values) == ["0", "2"] and values["0"].shape == (8,)
    torch.testing.assert_close(values["2"], layers["2"].noise.snr())
    penalty = SBPPenalty(0.01, warmup=4)
    assert float(penalty(model).detach()) == pytest.approx(0.01 * 0.25 * total, rel=1e-6)
    assert penalty.step == 1
    kl(model).backward()
    assert layers["0"].noise.log_sigma.grad is not None


def test_from_sbp_folds_the_mean_and_zeroes_the_removed_neurons():
    model = to_sbp(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 6), nn.ReLU(),
        nn.Linear(6, 2),
    ))  # fmt: skip
    with torch.no_grad():
        model[0].noise.mu.copy_(torch.tensor([0.0, -15.0, -1.0, -10.0]))
        model[0].noise.log_sigma.copy_(torch.tensor([-5.0, 2.0, -1.0, 3.0]))
        model[3].noise.mu.copy_(torch.tensor([0.0, -12.0, 0.0, 0.0, -5.0, 0.0]))
        model[3].noise.log_sigma.copy_(torch.tensor([-5.0, 2.5, -3.0, -4.0, 0.0, -5.0]))
    keep = {name: values >= 1 for name, values in snr(model).items()}
    assert keep["0"].tolist() == [True, False, True, False]
    assert keep["3"].tolist() == [True, False, True, True, False, True]
    plain, masks = from_sbp(model)
    assert [type(m) for m in plain] == [nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear, nn.ReLU,
                                        nn.Linear]  # fmt: skip
    assert set(plain.state_dict()) == {f"{i}.{p}" for i in (0, 3, 5) for p in ("weight", "bias")}
    assert list(masks) == ["0.weight", "3.weight"]
    assert torch.equal(masks["0.weight"], keep["0"][:, None, None, None].expand(4, 3, 3, 3))
    assert torch.equal(masks["3.weight"], keep["3"][:, None].expand(6, 36))
    assert masks.num_kept() == 2 * 27 + 4 * 36
    for name in ("0", "3"):
        removed = ~keep[name]
        assert (plain.get_submodule(name).weight[removed] == 0).all()
        assert (plain.get_submodule(name).bias[removed] == 0).all()
    # eval: the SBP model with the removed neurons' outputs 0 computes what the plain one does
    model.eval()
    for name in ("0", "3"):
        with torch.no_grad():  # the plain model drops them: give them a mean of e^-20 here
            layer = model.get_submodule(name)
            layer.noise.mu[~keep[name]] = -20.0
            layer.noise.log_sigma[~keep[name]] = -20.0
    x = torch.randn(5, 3, 5, 5)
    torch.testing.assert_close(plain.eval()(x), model(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no SBP layer"):
        from_sbp(plain)


def test_state_dict_round_trip():
    model = to_sbp(mlp())
    with torch.no_grad():
        for layer in sbp_layers(model).values():
            layer.noise.mu.uniform_(-5, 0)
            layer.noise.log_sigma.uniform_(-3, 1)
    fresh = to_sbp(mlp(seed=1))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 6)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    for name in ("0", "2"):
        assert torch.equal(snr(fresh)[name], snr(model)[name])


# --- a short training --------------------------------------------------------------------------


def test_training_with_the_kl_removes_neurons_and_keeps_the_accuracy():
    data = winnow.data.load("synthetic", n_train=512, n_test=256, seed=0)
    torch.manual_seed(0)
    dense = models.create("mlp", in_channels=1, input_size=8, num_classes=4, hidden=[64])
    winnow.train(dense, data, winnow.TrainConfig(iterations=150, lr=1e-2, batch_size=64))
    model = to_sbp(dense)
    (name,) = sbp_layers(model)
    assert (snr(model)[name] > 1).all()  # nothing removable at the start
    config = winnow.TrainConfig(iterations=1500, lr=1e-2, batch_size=64, eval_every=1500)
    result = winnow.train(model, data, config, regularizer=SBPPenalty(1 / len(data.x_train)))
    removed = int((snr(model)[name] < 1).sum())
    assert removed >= 16  # about 56 of the 64 hidden neurons
    plain, masks = from_sbp(model)
    assert masks.numel() - masks.num_kept() == removed * 64
    accuracy = winnow.evaluate(plain, data.x_test, data.y_test)[1]
    assert accuracy >= result.final["test_acc"] - 0.03
    assert accuracy > 0.8
