"""Pruning after and during training: OBD, OBS / WoodFisher, Taylor, group selection,
neuron folding and merging, gradual and dense-sparse-dense schedules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import winnow
from winnow import criteria
from winnow.core.groups import select_groups
from winnow.core.masks import Masks
from winnow.core.prunable import prunable_parameters
from winnow.criteria.fisher import (
    WoodFisherOptions,
    fisher_inverse_blocks,
    obs_update,
    per_sample_gradients,
    woodfisher_inverses,
)
from winnow.neurons import fold_constant_neurons, linear_chains, merge_neurons
from winnow.schedules import DenseSparseDense, GradualPruner, obs_prune, polynomial_sparsity


@pytest.fixture(scope="module")
def data():
    return winnow.data.load("synthetic", n_train=300, n_test=100, input_shape=(1, 6, 6))


def mlp(seed: int = 0) -> nn.Module:
    return winnow.models.create("mlp", 4, 1, 6, seed=seed, hidden=(12, 10))


@pytest.fixture(scope="module")
def trained(data):
    model = mlp()
    winnow.train(model, data, winnow.TrainConfig(iterations=150, lr=1e-2, batch_size=32))
    return model


def _loop_gradients(model, params, x, y):
    out = []
    for j in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[j : j + 1]), y[j : j + 1])
        out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out)


# -- OBS / WoodFisher ----------------------------------------------------------------------------
def test_obs_update_equals_the_constrained_minimum_of_a_quadratic():
    """L(θ) = ½(θ − θ*)ᵀH(θ − θ*): removing the set Q from θ* with δθ = −H⁻¹[:, Q]([H⁻¹]_QQ)⁻¹θ_Q
    is the exact minimiser of L subject to θ_Q = 0, and for one weight the loss rises by
    θ_q² / (2 [H⁻¹]_qq)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    hessian = a @ a.T + 0.5 * torch.eye(8, dtype=torch.float64)
    theta = torch.randn(8, generator=gen, dtype=torch.float64)
    inverse = torch.linalg.inv(hessian)
    for removed in (torch.tensor([3]), torch.tensor([0, 5, 6])):
        new = obs_update(theta, inverse, removed)
        free = torch.tensor([i for i in range(8) if i not in removed.tolist()])
        exact = torch.zeros_like(theta)
        h_ff = hessian[free][:, free]
        h_fq = hessian[free][:, removed]
        exact[free] = theta[free] + torch.linalg.solve(h_ff, h_fq @ theta[removed])
        torch.testing.assert_close(new, exact)
        assert torch.all(new[removed] == 0)
    q = 3
    new = obs_update(theta, inverse, torch.tensor([q]))
    increase = 0.5 * (new - theta) @ hessian @ (new - theta)
    torch.testing.assert_close(increase, theta[q] ** 2 / (2 * inverse[q, q]))


@pytest.mark.parametrize("chunk", [1, 7, 8, 50])
def test_sherman_morrison_blocks_equal_the_inverse_of_the_damped_fisher(chunk):
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(50, 24, generator=gen, dtype=torch.float64)
    damp = 0.3
    chunks = [grads[i : i + chunk] for i in range(0, 50, chunk)]
    blocks = fisher_inverse_blocks(chunks, 8, damp, 50)
    assert blocks.shape == (3, 8, 8)
    for b in range(3):
        g = grads[:, 8 * b : 8 * b + 8]
        fisher = g.T @ g / 50 + damp * torch.eye(8, dtype=torch.float64)
        torch.testing.assert_close(blocks[b], torch.linalg.inv(fisher))


def test_per_sample_gradients_and_woodfisher_inverse_on_a_model(trained, data):
    params = prunable_parameters(trained)
    x, y = data.x_train[:20], data.y_train[:20]
    grads = per_sample_gradients(trained, params, (x, y))
    reference = _loop_gradients(trained, list(params.values()), x, y)
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    torch.testing.assert_close(flat, reference)
    inverses = woodfisher_inverses(
        trained, (x, y), options=WoodFisherOptions(samples=20, block_size=6, damp=1e-3, chunk=8)
    )
    first = reference[:, :6].double()
    fisher = first.T @ first / 20 + 1e-3 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(inverses["layers.1.weight"][0], torch.linalg.inv(fisher))


def test_obd_is_theta_squared_times_the_diagonal_fisher(trained, data):
    x, y = data.x_train[:30], data.y_train[:30]
    scores = criteria.score(trained, "obd", (x, y), samples=30, chunk=7)
    params = prunable_parameters(trained)
    grads = _loop_gradients(trained, list(params.values()), x, y)
    diag = grads.pow(2).mean(0)
    theta = torch.cat([p.detach().flatten() for p in params.values()])
    got = torch.cat([s.flatten() for s in scores.values()])
    torch.testing.assert_close(got, theta.pow(2) * diag / 2, rtol=1e-4, atol=1e-10)


def test_obs_prune_compensates_and_leaves_the_model_alone(trained, data):
    before = copy.deepcopy(trained.state_dict())
    pruned, masks = obs_prune(trained, 0.3, data, samples=200, block_size=12, damp=1e-4)
    assert masks.num_kept() == round(0.3 * masks.numel())
    for name, param in prunable_parameters(pruned).items():
        assert torch.all(param[~masks[name]] == 0)
    for key, value in trained.state_dict().items():
        assert torch.equal(value, before[key])
    plain = masks.apply(copy.deepcopy(trained))
    x, y = data.x_train[:200], data.y_train[:200]
    loss = winnow.evaluate(pruned, x, y)[0]
    assert loss < winnow.evaluate(plain, x, y)[0], "the OBS update should lower the loss"
    with pytest.raises(ValueError, match="MiB"):
        woodfisher_inverses(trained, data, options=WoodFisherOptions(block_size=12), max_memory=100)


# -- Taylor, groups, neurons ------------------------------------------------------------------
def test_taylor_is_the_accumulated_gate_gradient(trained, data):
    x, y = data.x_train[:40], data.y_train[:40]
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]  # an iterable is taken in order
    scores = criteria.score(trained, "taylor", batches, samples=40, batch_size=20)
    first = trained.layers[1]
    expected = torch.zeros(first.out_features)
    for start in (0, 20):
        outputs = []
        handle = first.register_forward_hook(lambda m, i, o, out=outputs: out.append(o))
        loss = nn.functional.cross_entropy(trained(x[start : start + 20]), y[start : start + 20])
        handle.remove()
        (grad,) = torch.autograd.grad(loss, outputs)
        expected += (grad * outputs[0]).sum(0).detach().abs()
    torch.testing.assert_close(scores["layers.1.weight"][:, 0], expected, rtol=1e-4, atol=1e-7)
    assert torch.all(scores["layers.1.weight"] == scores["layers.1.weight"][:, :1])


def test_select_groups_keeps_whole_filters_and_channels():
    gen = torch.Generator().manual_seed(0)
    scores = {
        "conv": torch.rand(8, 4, 3, 3, generator=gen),
        "fc": torch.rand(6, 32, generator=gen),
        "out": torch.rand(3, 6, generator=gen),
    }
    masks = select_groups(scores, 0.5, "filter", scope="layer", exclude=("out",))
    assert masks["out"].all()
    for name in ("conv", "fc"):
        rows = masks[name].reshape(masks[name].shape[0], -1)
        assert torch.all(rows.all(1) | ~rows.any(1)), "a filter was split"
        assert int(rows.all(1).sum()) == scores[name].shape[0] // 2
    kept_conv = masks["conv"].reshape(8, -1).all(1)
    means = scores["conv"].reshape(8, -1).mean(1)
    assert means[kept_conv].min() >= means[~kept_conv].max()
    channels = select_groups(scores, 0.25, "channel", scope="layer")
    assert torch.all(channels["conv"].any((0, 2, 3)) == channels["conv"].all(0).all(-1).all(-1))
    total = select_groups(scores, 0.4, "filter", scope="global", reduce="l2")
    assert abs(total.density() - 0.4) < 0.1
    with pytest.raises(ValueError, match="group"):
        select_groups(scores, 0.5, "kernel")
    with pytest.raises(ValueError, match="reduce"):
        select_groups(scores, 0.5, "filter", reduce="median")


def test_folding_a_constant_neuron_leaves_the_outputs_unchanged(trained, data):
    model = copy.deepcopy(trained)
    with torch.no_grad():
        model.layers[1].weight[:3] = 0
        model.layers[1].bias[:3] = torch.tensor([0.7, 0.0, 1.5])
    assert linear_chains(model) == [("layers.1", "layers.3"), ("layers.3", "layers.5")]
    folded, masks = fold_constant_neurons(
        model, data.x_train, count=3, chain=("layers.1", "layers.3")
    )
    assert masks["layers.3.weight"][:, :3].any() == False  # noqa: E712
    assert masks["layers.1.weight"][:3].any() == False  # noqa: E712
    torch.testing.assert_close(folded(data.x_test), model(data.x_test), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        fold_constant_neurons(model, data.x_train)
    with pytest.raises(ValueError, match="no Linear"):
        fold_constant_neurons(nn.Sequential(nn.Conv2d(1, 2, 3)), data.x_train, count=1)


def test_merging_identical_neurons_is_exact(trained, data):
    model = copy.deepcopy(trained)
    with torch.no_grad():
        first = model.layers[1]
        first.weight[5] = first.weight[2]
        first.bias[5] = first.bias[2]
    merged, masks = merge_neurons(model, 1, chain=("layers.1", "layers.3"))
    assert not masks["layers.1.weight"][[2, 5]].all(1).all()
    torch.testing.assert_close(merged(data.x_test), model(data.x_test), rtol=0, atol=1e-5)
    fewer, _ = merge_neurons(trained, 4)
    assert fewer.layers[1].weight.abs().sum(1).eq(0).sum() == 4


# -- schedules during training ----------------------------------------------------------------
def test_polynomial_schedule_hits_the_final_sparsity():
    assert polynomial_sparsity(100, 0.9, 100, 10, 20) == 0.0
    assert polynomial_sparsity(300, 0.9, 100, 10, 20) == pytest.approx(0.9, abs=0)
    assert polynomial_sparsity(1000, 0.9, 100, 10, 20) == 0.9
    mid = polynomial_sparsity(200, 0.9, 100, 10, 20)
    assert mid == pytest.approx(0.9 + (0.0 - 0.9) * (1 - 0.5) ** 3)
    values = [polynomial_sparsity(t, 0.9, 100, 10, 20) for t in range(100, 301, 20)]
    assert values == sorted(values)


def test_gradual_pruning_through_training(data):
    model = mlp()
    pruner = GradualPruner(0.8, begin=10, end=70, frequency=15)
    config = winnow.TrainConfig(iterations=100, batch_size=32, eval_every=50)
    result = winnow.train(model, data, config, pruner=pruner)
    assert result.masks is not None
    assert result.masks.num_kept() == round(0.2 * result.masks.numel())
    for name, param in prunable_parameters(model).items():
        assert torch.all(param[~result.masks[name]] == 0)
    with pytest.raises(ValueError, match="multiple"):
        GradualPruner(0.8, begin=0, end=70, frequency=15)
    with pytest.raises(ValueError, match="sparsity"):
        GradualPruner(1.0, begin=0, end=60, frequency=15)
    with pytest.raises(ValueError, match="ends at iteration"):
        winnow.train(mlp(), data, winnow.TrainConfig(iterations=50), pruner=pruner)


def test_gradual_sparsity_rises_along_the_schedule(data):
    seen = []

    class Recorder(GradualPruner):
        def step(self, iteration, model):
            masks = super().step(iteration, model)
            if masks is not None:
                seen.append((iteration, masks.sparsity()))
            return masks

    pruner = Recorder(0.9, begin=0, end=40, frequency=10)
    winnow.train(mlp(), data, winnow.TrainConfig(iterations=40, batch_size=32), pruner=pruner)
    assert [t for t, _ in seen] == [0, 10, 20, 30, 40]
    for t, sparsity in seen:
        assert sparsity == pytest.approx(pruner.sparsity(t), abs=2 / 400)


def test_dense_sparse_dense(data):
    model = mlp()
    dsd = DenseSparseDense([(20, 0.3), (50, 1.0), (80, 0.3)])
    seen = {}

    revived = {}

    def recording(iteration, model_):
        if iteration == 80:  # end of the dense phase: what the sparse phase had pruned
            weight = model_.layers[1].weight.detach()
            revived["count"] = int((weight[~seen[20]["layers.1.weight"]] != 0).sum())
        masks = dsd(iteration, model_)
        if masks is not None:
            seen[iteration] = masks
        return masks

    config = winnow.TrainConfig(iterations=100, batch_size=32)
    result = winnow.train(model, data, config, pruner=recording)
    assert sorted(seen) == [20, 50, 80]
    assert seen[20].density() == pytest.approx(0.3, abs=0.01) and seen[50].density() == 1.0
    assert result.masks == seen[80]
    for name, param in prunable_parameters(model).items():
        assert torch.all(param[~seen[80][name]] == 0)
    # every weight pruned in the sparse phase came back from 0.0 and trained in the dense one
    assert revived["count"] == int((~seen[20]["layers.1.weight"]).sum())
    with pytest.raises(ValueError, match="increasing"):
        DenseSparseDense([(50, 0.3), (20, 1.0)])


def test_enforcer_update_zeroes_new_pruned_weights_and_their_state():
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 4, (16,))
    masks = Masks.ones(model)
    enforcer = winnow.enforce(model, masks, optimizer)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    half = winnow.select(winnow.score(model, "magnitude"), 0.5)
    enforcer.update(half)
    for name, param in prunable_parameters(model).items():
        assert torch.all(param[~half[name]] == 0)
        state = optimizer.state[param]
        assert torch.all(state["exp_avg"][~half[name]] == 0)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for name, param in prunable_parameters(model).items():
        assert torch.all(param[~half[name]] == 0)
    enforcer.update(Masks.ones(model))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    for name, param in prunable_parameters(model).items():
        restored = ~half[name] & (param.grad != 0)
        assert restored.any() and torch.all(param[restored] != 0), "restored weights train"
    enforcer.remove()
    with pytest.raises(ValueError, match="different tensors"):
        enforcer.update(Masks({"layers.1.weight": half["layers.1.weight"]}))
