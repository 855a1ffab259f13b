"""Dynamic sparse training (SET, RigL, momentum growth), layer-wise density distributions, the
dense gradients enforcement captures for growth, and resuming a run from its saved state."""

import math

import pytest
import torch
from torch import nn

import winnow
from winnow.core.distributions import layer_counts, layer_densities, raw_density
from winnow.schedules.growth import (
    DropGrow,
    DynamicSparsity,
    drop_and_grow,
    rigl_pruner,
    set_pruner,
    update_fraction,
)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip


def data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :4].argmax(1)).long()
    return x, y


# -- distributions ----------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.2, 0.5])
def test_densities_meet_the_global_budget(distribution, density):
    model = cnn()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() > 1}
    d = layer_densities(shapes, density, distribution)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    assert sum(d[n] * sizes[n] for n in d) == pytest.approx(density * sum(sizes.values()))
    assert all(0.0 <= v <= 1.0 for v in d.values())
    counts = layer_counts(d, sizes)
    assert sum(counts.values()) == round(density * sum(sizes.values()))


def test_erk_is_proportional_to_sum_over_product_and_caps_at_dense():
    shapes = {"a": (8, 1, 3, 3), "b": (16, 8, 3, 3), "c": (10, 256)}
    d = layer_densities(shapes, 0.5, "erk")
    # the small first layer would exceed 1 at this budget: it is dense, the rest share the rest
    assert d["a"] == 1.0
    ratio = d["b"] / d["c"]
    assert ratio == pytest.approx(raw_density((16, 8, 3, 3), "erk") / raw_density((10, 256), "erk"))
    assert raw_density((16, 8, 3, 3), "erk") == pytest.approx(30 / 1152)
    assert raw_density((16, 8, 3, 3), "er") == pytest.approx(24 / 128)


def test_dense_first_layer_counts_in_the_budget():
    model = mlp()
    d = layer_densities(model, 0.5, "uniform", dense_first=True)
    first = next(iter(d))
    assert d[first] == 1.0
    sizes = {n: p.numel() for n, p in model.named_parameters() if p.dim() > 1}
    assert sum(d[n] * sizes[n] for n in d) == pytest.approx(0.5 * sum(sizes.values()))
    with pytest.raises(ValueError, match="alone keep more"):
        layer_densities(model, 0.2, "uniform", dense_first=True)
    with pytest.raises(ValueError, match="unknown distribution"):
        layer_densities(model, 0.1, "gaussian")


def test_static_random_erk_through_the_pruner():
    model = cnn()
    d = layer_densities(model, 0.1, "erk")
    masks = winnow.Pruner("random", winnow.schedules.OneShot(d)).prune(model)
    sizes = {n: m.numel() for n, m in masks.items()}
    assert {n: int(m.sum()) for n, m in masks.items()} == {n: round(d[n] * sizes[n]) for n in d}


# -- the update rule ----------------------------------------------------------------------------
def test_update_fraction_follows_the_cosine_and_stops():
    assert update_fraction(0, 0.3, 1000) == pytest.approx(0.3)
    assert update_fraction(500, 0.3, 1000) == pytest.approx(0.15)
    assert update_fraction(250, 0.3, 1000) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert update_fraction(1000, 0.3, 1000) == 0.0
    schedule = DropGrow(update_every=100, alpha=0.3, end=750)
    assert schedule.iterations() == [0, 100, 200, 300, 400, 500, 600, 700]
    assert schedule.fraction(150) == 0.0 and schedule.fraction(800) == 0.0
    assert schedule.fraction(300) == pytest.approx(0.15 * (1 + math.cos(math.pi * 300 / 750)))


def test_drop_and_grow_against_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(12, 10, generator=g) < 0.3
    weight = torch.randn(12, 10, generator=g) * keep
    grad = torch.randn(12, 10, generator=g)
    k = 7
    new, grown = drop_and_grow(keep, weight.abs(), grad.abs(), k)
    assert int(new.sum()) == int(keep.sum())
    # direct: drop the k smallest active magnitudes; grow the k largest |grad| among the rest
    active = [(weight.abs().flatten()[i].item(), i) for i in range(120) if keep.flatten()[i]]
    dropped = {i for _, i in sorted(active)[:k]}
    after = {i for i in range(120) if keep.flatten()[i] and i not in dropped}
    candidates = sorted(
        (i for i in range(120) if i not in after),
        key=lambda i: (-grad.abs().flatten()[i].item(), i),
    )
    expected = after | set(candidates[:k])
    assert set(torch.nonzero(new.flatten()).flatten().tolist()) == expected
    assert torch.equal(grown, new & ~keep)


def test_drop_and_grow_ties_by_position_and_errors():
    keep = torch.tensor([True, True, True, False, False, False])
    new, _ = drop_and_grow(keep, torch.ones(6), torch.ones(6), 2)
    # drops positions 0 and 1 (the earliest of equal scores), grows 0 and 1 back first
    assert new.tolist() == [True, True, True, False, False, False]
    new, _ = drop_and_grow(keep, torch.tensor([3.0, 1, 2, 0, 0, 0]), torch.arange(6.0), 1)
    assert new.tolist() == [True, False, True, False, False, True]
    with pytest.raises(ValueError, match="NaN"):
        drop_and_grow(keep, torch.tensor([math.nan] * 6), torch.ones(6), 1)


# -- training ---------------------------------------------------------------------------------
def config(iterations=300, **kw):
    return winnow.TrainConfig(iterations=iterations, batch_size=32, lr=3e-3, eval_every=100, **kw)


class Watch(winnow.training.Callback):
    """Records per layer the kept count, and checks the grown weights' values and state."""

    def __init__(self, pruner, optimizer):
        self.pruner, self.optimizer, self.counts, self.grown_checked = pruner, optimizer, [], 0

    def after_step(self, iteration, model):
        params = dict(model.named_parameters())
        self.counts.append({n: int(m.sum()) for n, m in self.pruner.masks.items()})
        for name, m in self.pruner.masks.items():
            assert torch.all(params[name][~m] == 0)
        if self.pruner.grown is not None and self.pruner.schedule.is_update(iteration):
            for name, grown in self.pruner.grown.items():
                if grown.any():
                    assert torch.all(params[name][grown] == 0)
                    state = self.optimizer.state[params[name]]
                    for value in state.values():
                        if torch.is_tensor(value) and value.shape == grown.shape:
                            assert torch.all(value[grown] == 0)
                    self.grown_checked += 1


@pytest.mark.parametrize("grow", ["random", "gradient", "momentum"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_keeps_counts_and_grows_from_zero(grow, optimizer):
    model = mlp()
    pruner = DynamicSparsity(0.2, 300, grow=grow, update_every=50, distribution="erk", seed=1)
    cfg = config(optimizer=optimizer, momentum=0.9)
    opt = winnow.training.make_optimizer(model, cfg)
    watch = Watch(pruner, opt)
    first = None

    class First(winnow.training.Callback):
        def after_step(self, iteration, model):
            nonlocal first
            if first is None:
                first = winnow.Masks({n: m.clone() for n, m in pruner.masks.items()})

    result = winnow.train(
        model, data(), cfg, pruner=pruner, optimizer=opt, callbacks=[First(), watch]
    )
    assert all(c == watch.counts[0] for c in watch.counts)  # exact count per layer throughout
    assert watch.grown_checked > 0
    assert result.masks == pruner.masks and result.masks != first  # the masks moved
    assert result.masks.density() == pytest.approx(0.2, abs=1e-3)


def test_rigl_grows_the_top_dense_gradient_positions():
    """At an update, RigL's new masks are exactly drop_and_grow with the gradient of the batch
    of that step computed densely by hand."""
    model = mlp()
    x, y = data()
    pruner = rigl_pruner(0.2, 200, update_every=100, distribution="uniform")
    cfg = config(iterations=200, optimizer="sgd", momentum=0.0)
    seen = {}

    class Spy(winnow.training.Callback):
        def after_step(self, iteration, model):
            if iteration == 99:
                seen["masks"] = winnow.Masks({n: m.clone() for n, m in pruner.masks.items()})
                seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}

    batches = list(winnow.training._Stream((x, y), cfg).steps(200, 0))
    winnow.train(model, (x, y), cfg, pruner=pruner, callbacks=[Spy()])
    # recompute step 100 by hand: dense gradient of its batch at the weights after step 99
    again = mlp()
    again.load_state_dict(seen["state"])
    bx, by = batches[99][1][0]
    nn.functional.cross_entropy(again(bx), by).backward()
    params = dict(again.named_parameters())
    fraction = update_fraction(100, 0.3, 150)
    for name, keep in seen["masks"].items():
        weight = params[name].detach() - 3e-3 * params[name].grad * keep  # the step's SGD update
        expected, _ = drop_and_grow(keep, weight.abs(), params[name].grad.abs(),
                                    round(fraction * int(keep.sum())))  # fmt: skip
        assert torch.equal(pruner.masks[name], expected), name


def test_dense_gradients_are_captured_only_when_asked():
    model = mlp()
    masks = winnow.Masks(
        {n: torch.rand_like(p) < 0.5 for n, p in model.named_parameters() if p.dim() > 1}
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    enforcer = winnow.enforce(model, masks, opt)
    x, y = data(64)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert enforcer.dense_gradients() == {}
    opt.zero_grad()
    reference = mlp()
    reference.load_state_dict(model.state_dict())
    nn.functional.cross_entropy(reference(x), y).backward()
    enforcer.capture_dense_gradients()
    nn.functional.cross_entropy(model(x), y).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    dense = enforcer.dense_gradients()
    for name, p in reference.named_parameters():
        if name in masks:
            torch.testing.assert_close(dense[name], p.grad)  # dense, not masked
            assert torch.all(dict(model.named_parameters())[name][~masks[name]] == 0)
            # the step itself applied the masked gradient
            torch.testing.assert_close(
                dict(model.named_parameters())[name], before[name] - 0.1 * p.grad * masks[name]
            )
    assert enforcer.dense_gradients() == {}  # handed over once


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown growth"):
        DynamicSparsity(0.1, 100, grow="magic")
    with pytest.raises(ValueError, match="density"):
        DynamicSparsity(1.5, 100)
    with pytest.raises(ValueError, match="needs data"):
        DynamicSparsity(0.1, 100, drop="snip")
    pruner = rigl_pruner(0.2, 200, update_every=10)
    model = mlp()
    pruner.step(0, model)
    with pytest.raises(ValueError, match="dense gradients"):
        pruner.step(10, model)
    with pytest.raises(ValueError, match="winnow.train"):
        pruner.prune(model)
    with pytest.raises(ValueError, match="ends at iteration"):
        winnow.train(mlp(), data(), config(iterations=100), pruner=rigl_pruner(0.2, 400))


# -- resuming ---------------------------------------------------------------------------------
class Killed(Exception):
    pass


class KillAt(winnow.training.Callback):
    def __init__(self, at):
        self.at = at

    def after_step(self, iteration, model):
        if iteration == self.at:
            raise Killed


@pytest.mark.parametrize("make", [set_pruner, rigl_pruner])
def test_resume_after_a_kill_is_bit_identical(tmp_path, make):
    cfg = config(iterations=300, optimizer="adam")
    whole = mlp()
    reference = winnow.train(whole, data(), cfg, pruner=make(0.2, 300, update_every=40))
    model, state = mlp(), tmp_path / "state.safetensors"
    with pytest.raises(Killed):
        winnow.train(model, data(), cfg, pruner=make(0.2, 300, update_every=40),
                     checkpoint=state, callbacks=[KillAt(250)])  # fmt: skip
    assert state.exists()
    model = mlp(seed=5)  # a fresh process: other weights, restored from the file
    pruner = make(0.2, 300, update_every=40)
    result = winnow.train(model, data(), cfg, pruner=pruner, checkpoint=state)
    assert result.history == reference.history
    for (n, a), b in zip(whole.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert result.masks == reference.masks


def test_a_damaged_state_file_is_an_error(tmp_path):
    state = tmp_path / "state.safetensors"
    winnow.train(mlp(), data(), config(iterations=100), checkpoint=state)
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state.write_bytes(bytes(raw))
    with pytest.raises(winnow.io.WinnowFileError):
        winnow.train(mlp(), data(), config(iterations=100), checkpoint=state)


@pytest.mark.parametrize("seed", range(5))
def test_top_by_position_matches_a_stable_sort(seed):
    from winnow.core.ranking import top_by_position

    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (200,), generator=g).float()  # many ties
    for count in (0, 1, 17, 100, 200):
        expected = sorted(range(200), key=lambda i: (-scores[i].item(), i))[:count]
        assert sorted(top_by_position(scores, count).tolist()) == sorted(expected)


@pytest.mark.parametrize("seed", range(5))
def test_lowest_mask_matches_a_stable_sort(seed):
    from winnow.core.ranking import lowest_mask

    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (20, 10), generator=g).float()  # many ties
    flat = scores.flatten()
    for count in (0, 1, 37, 100, 200):
        expected = set(sorted(range(200), key=lambda i: (flat[i].item(), i))[:count])
        assert (
            set(torch.nonzero(lowest_mask(scores, count).flatten()).flatten().tolist()) == expected
        )
