"""The training loop: learns, honours masks, deterministic, checkpoints, resumes, validates."""

import pytest
import torch

import winnow
from winnow import Masks, TrainConfig, evaluate, models, prunable_parameters, train
from winnow.inputs import DataError
from winnow.training import lr_factor


@pytest.fixture(scope="module")
def data():
    return winnow.data.load("synthetic", n_train=600, n_test=200, val_size=100)


def small_model(data, seed=0):
    return models.create("mlp", in_channels=1, input_size=8, num_classes=4, hidden=[32], seed=seed)


def test_training_learns_the_task(data):
    model = small_model(data)
    result = train(model, data, TrainConfig(epochs=3, batch_size=32, lr=3e-3))
    assert result.final["test_acc"] > 0.8
    assert result.history[0]["train_loss"] > result.history[-1]["train_loss"]
    assert [r["iteration"] for r in result.history] == [16, 32, 48]  # eval once per epoch


def test_same_seed_gives_bitwise_identical_weights(data):
    config = TrainConfig(iterations=40, batch_size=16, optimizer="sgd", lr=0.05, seed=3)
    states = []
    for _ in range(2):
        model = small_model(data)
        train(model, data, config)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = small_model(data)
    train(other, data, TrainConfig(iterations=40, batch_size=16, optimizer="sgd", lr=0.05, seed=4))
    assert not torch.equal(other.state_dict()["layers.1.weight"], states[0]["layers.1.weight"])


def test_training_leaves_global_rng_alone(data):
    before = torch.random.get_rng_state()
    train(small_model(data), data, TrainConfig(iterations=5, batch_size=16))
    assert torch.equal(before, torch.random.get_rng_state())


def test_masks_are_honoured_and_hooks_removed(data):
    model = small_model(data)
    gen = torch.Generator().manual_seed(0)
    masks = Masks(
        {n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in prunable_parameters(model).items()}
    )
    train(
        model,
        data,
        TrainConfig(iterations=50, batch_size=16, optimizer="adamw", weight_decay=0.1),
        masks=masks,
    )
    for n, p in prunable_parameters(model).items():
        assert torch.all(p[~masks[n]] == 0)
    # hooks are gone: a further dense step moves pruned weights
    train(model, data, TrainConfig(iterations=2, batch_size=16, lr=0.1))
    assert any(bool((p[~masks[n]] != 0).any()) for n, p in prunable_parameters(model).items())


def test_checkpoints_and_rewinding(data):
    config = TrainConfig(
        iterations=30,
        batch_size=16,
        optimizer="sgd",
        lr=0.05,
        momentum=0.0,
        save_at=(0, 10),
        eval_every=10,
    )
    model = small_model(data)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, data, config)
    assert sorted(result.checkpoints) == [0, 10]
    assert all(torch.equal(result.checkpoints[0][k], init[k]) for k in init)
    # resuming at 10 from the iteration-10 weights with plain SGD (stateless) reproduces the run
    resumed = small_model(data)
    resumed.load_state_dict(result.checkpoints[10])
    tail = train(resumed, data, config, start_iteration=10)
    assert tail.iterations == 20
    assert [r["iteration"] for r in tail.history] == [20, 30]
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    with pytest.raises(ValueError, match="start_iteration"):
        train(small_model(data), data, config, start_iteration=31)


def test_early_stop_row_has_minimum_validation_loss(data):
    result = train(
        small_model(data), data, TrainConfig(iterations=60, batch_size=16, eval_every=10)
    )
    best = min(r["val_loss"] for r in result.history)
    assert result.early_stop["val_loss"] == best


def test_regularizer_is_added_to_the_loss(data):
    def l1(model):
        return 1.0 * sum(p.abs().sum() for p in prunable_parameters(model).values())

    plain, shrunk = small_model(data), small_model(data)
    config = TrainConfig(iterations=50, batch_size=16, optimizer="sgd", lr=0.01)
    train(plain, data, config)
    train(shrunk, data, config, regularizer=l1)
    norm = lambda m: sum(float(p.detach().abs().sum()) for p in prunable_parameters(m).values())  # noqa: E731
    assert norm(shrunk) < 0.8 * norm(plain)


def test_evaluate_restores_mode_and_refuses_empty_data(data):
    model = models.create("vgg11", in_channels=1, input_size=8, num_classes=4)
    model.train()
    loss, acc = evaluate(model, data.x_test[:20], data.y_test[:20])
    assert model.training and 0 <= acc <= 1 and loss > 0
    with pytest.raises(DataError, match="no examples to evaluate"):
        evaluate(model, data.x_test[:0], data.y_test[:0])
    assert model.training


def test_lr_schedules():
    step = TrainConfig(iterations=100, lr_schedule="step", milestones=(10, 20), gamma=0.5)
    assert [lr_factor(step, i, 100) for i in (0, 10, 25)] == [1.0, 0.5, 0.25]
    cos = TrainConfig(iterations=100, lr_schedule="cosine")
    assert lr_factor(cos, 0, 100) == 1.0 and lr_factor(cos, 100, 100) == pytest.approx(0.0)
    warm = TrainConfig(iterations=100, warmup=4)
    assert [lr_factor(warm, i, 100) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of"),
        ({"iterations": 10, "epochs": 1}, "exactly one of"),
        ({"iterations": 10, "optimizer": "lion"}, "unknown optimizer 'lion'"),
        ({"iterations": 10, "lr_schedule": "exp"}, "unknown lr_schedule"),
        ({"iterations": 10, "batch_size": 0}, "batch_size"),
        ({"iterations": 10, "lr": 0}, "lr must be > 0"),
        ({"epochs": -1}, "epochs"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)
