"""Analyses: gradient norm, per-layer densities, shuffling control, connectivity."""

import torch

import winnow
from winnow import Masks, models, prune_at_init
from winnow.analysis import (
    gradient_norm,
    is_connected,
    layer_densities,
    layer_density_table,
    shuffle_within_layers,
)


def test_gradient_norm_of_pruned_network_and_model_untouched():
    data = winnow.data.load("synthetic", n_train=200, n_test=50)
    model = models.create_for("mlp", data, hidden=[32])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = gradient_norm(model, data)
    empty = Masks({n: torch.zeros_like(m) for n, m in Masks.ones(model).items()})
    assert dense > 0
    assert gradient_norm(model, data, empty) == 0.0
    half = prune_at_init(model, "magnitude", 0.5)
    assert 0 < gradient_norm(model, data, half) != dense
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layer_density_table_side_by_side():
    model = models.create("lenet300", input_size=8)
    a = prune_at_init(model, "magnitude", 0.1)
    b = prune_at_init(model, "random", 0.1, scope="layer")
    table = layer_densities({"magnitude": a, "random": b})
    assert set(table) == set(a)
    assert all(abs(row["random"] - 0.1) < 0.01 for row in table.values())
    text = layer_density_table({"magnitude": a, "random": b})
    assert text.splitlines()[0] == "| layer | magnitude | random |"
    assert "**all** | 10.00% | 10.00%" in text


def test_shuffle_keeps_per_layer_density_and_changes_positions():
    model = models.create("lenet300", input_size=8)
    masks = prune_at_init(model, "magnitude", 0.2)
    shuffled = shuffle_within_layers(masks, seed=1)
    assert shuffled.layer_density() == masks.layer_density()
    assert shuffled != masks
    assert shuffle_within_layers(masks, seed=1) == shuffled


def test_is_connected_through_conv_flatten_linear():
    model = models.create("conv2", input_size=8)
    full = Masks.ones(model)
    assert is_connected(full)
    names = list(full)
    cut = Masks({n: (torch.zeros_like(m) if n == names[1] else m) for n, m in full.items()})
    assert not is_connected(cut)
