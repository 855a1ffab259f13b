"""The adaptive pruning rate driven by the generalisation loss (after Prechelt 1997): GL, the
rate's rule, when it prunes, how many weights it removes, and its use in winnow.train."""

import math

import pytest
import torch
from torch import nn

import winnow
from winnow.core.masks import Masks
from winnow.schedules import AdaptiveRate, ObserveValidation, Pruner
from winnow.schedules.adaptive import generalisation_loss
from winnow.schedules.density import pruned_count

pytestmark = pytest.mark.usefixtures("one_thread")


def all_kept(shapes: dict[str, tuple[int, ...]]) -> Masks:
    return Masks({n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()})


def test_generalisation_loss_is_prechelts():
    assert generalisation_loss(1.1, 1.0) == pytest.approx(10.0)
    assert generalisation_loss(0.5, 0.5) == 0.0
    assert generalisation_loss(0.0, 0.0) == 0.0
    assert generalisation_loss(1.0, 0.0) == math.inf


def test_observe_tracks_the_best_and_the_gl():
    schedule = AdaptiveRate(0.5, gl_max=10.0)
    losses = [1.0, 0.8, 0.84, 0.9, 0.7, 0.77]
    expected = [0.0, 0.0, 5.0, 12.5, 0.0, 10.0]
    for loss, gl in zip(losses, expected, strict=True):
        assert schedule.observe(loss) == pytest.approx(gl)
        assert schedule.gl == pytest.approx(gl)
    assert schedule.best == 0.7 and schedule.observations == 6
    schedule.reset()
    assert schedule.best is None and schedule.observations == 0 and not schedule.pending
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite and >= 0"):
            schedule.observe(bad)


def test_the_rate_rises_with_gl_and_stays_at_its_minimum_while_validation_improves():
    schedule = AdaptiveRate(max_rate=0.6, min_rate=0.1, gl_max=4.0)
    rates = [schedule.rate_for(gl) for gl in (0.0, 1.0, 2.0, 3.0, 4.0, 8.0, math.inf)]
    assert rates == pytest.approx([0.1, 0.225, 0.35, 0.475, 0.6, 0.6, 0.6])
    assert all(a <= b for a, b in zip(rates, rates[1:], strict=False))
    for loss in (1.0, 0.9, 0.85, 0.5):  # improving: GL = 0 every time
        schedule.observe(loss)
        assert schedule.rate == 0.1
    schedule.observe(0.51)  # 2% worse than the best
    assert schedule.rate == pytest.approx(0.35)


def test_it_prunes_once_per_observation_and_counts_like_prune_rate():
    shapes = {"a.weight": (10, 7), "b.weight": (3, 3)}
    schedule = AdaptiveRate(max_rate=0.5, min_rate=0.1, gl_max=10.0)
    current = all_kept(shapes)
    assert schedule.target(0, current) is None  # nothing observed yet
    schedule.observe(1.0)
    target = schedule.target(1, current)
    assert target.cumulative
    assert target.density == {
        "a.weight": (70 - pruned_count(0.1, 70)) / 70,
        "b.weight": (9 - pruned_count(0.1, 9)) / 9,
    }
    assert schedule.target(2, current) is None  # one step per observation
    schedule.observe(1.05)  # GL = 5: rate 0.3
    target = schedule.target(3, current)
    assert target.density["a.weight"] == pytest.approx((70 - 21) / 70)
    assert target.density["b.weight"] == pytest.approx((9 - 3) / 9)
    assert schedule.rates == pytest.approx([0.1, 0.3])
    glob = AdaptiveRate(max_rate=0.5, gl_max=10.0, scope="global")
    glob.observe(1.0)
    glob.observe(1.2)  # GL = 20: the maximum
    assert glob.target(0, current).density == pytest.approx((79 - pruned_count(0.5, 79)) / 79)
    with pytest.raises(ValueError, match="needs the masks"):
        glob.observe(1.0) or glob.target(1, None)


def test_the_protocol_and_the_checks():
    schedule = AdaptiveRate(0.3)
    assert schedule.relative and schedule.iterations() is None
    assert "max_rate=0.3" in repr(schedule)
    with pytest.raises(ValueError, match="min_rate"):
        AdaptiveRate(0.1, min_rate=0.2)
    with pytest.raises(ValueError, match="sparsity"):
        AdaptiveRate(1.0)
    with pytest.raises(ValueError, match="gl_max"):
        AdaptiveRate(0.5, gl_max=0.0)
    with pytest.raises(ValueError, match="scope"):
        AdaptiveRate(0.5, scope="everywhere")
    callback = schedule.callback()
    assert isinstance(callback, ObserveValidation) and callback.key == "val_loss"
    with pytest.raises(ValueError, match="no 'val_loss'"):
        callback.after_eval({"iteration": 0, "train_loss": 1.0, "test_loss": 0.5}, nn.Linear(1, 1))


def test_in_training_it_prunes_after_every_evaluation_by_the_observed_gl():
    data = winnow.data.load("synthetic", n_train=256, n_test=128, seed=0)
    torch.manual_seed(0)
    model = winnow.models.create("mlp", in_channels=1, input_size=8, num_classes=4, hidden=[32])
    schedule = AdaptiveRate(max_rate=0.4, min_rate=0.1, gl_max=5.0)
    pruner = Pruner("magnitude", schedule)
    seen = []

    class Watch(winnow.training.Callback):
        def after_eval(self, row, model):
            seen.append((row["val_loss"], schedule.gl, schedule.rate))

    config = winnow.TrainConfig(iterations=60, lr=1e-2, batch_size=32, eval_every=10)
    winnow.train(model, data, config, pruner=pruner, callbacks=[schedule.callback(), Watch()])
    assert schedule.observations == len(seen) >= 6
    # one step after each evaluation but the last one, after the last step
    assert schedule.pending and len(schedule.rates) == schedule.observations - 1
    best = math.inf
    for (loss, gl, rate), taken in zip(seen, schedule.rates, strict=False):
        best = min(best, loss)
        assert gl == pytest.approx(100 * (loss / best - 1))
        assert rate == pytest.approx(0.1 + 0.3 * min(1.0, gl / 5.0))
        assert taken == pytest.approx(rate)
    alive = {n: p.numel() for n, p in model.named_parameters() if n.endswith("weight")}
    for rate in schedule.rates:
        alive = {n: k - pruned_count(rate, k) for n, k in alive.items()}
    assert {n: int(m.sum()) for n, m in pruner.masks.items()} == alive
