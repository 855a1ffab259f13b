"""Criteria: SNIP, GraSP, SynFlow against independent computations; no criterion mutates."""

import copy
import warnings

import pytest
import torch
from torch import nn

import winnow
from winnow import criteria, models, prunable_parameters
from winnow.analysis import is_connected
from winnow.criteria.grasp import hessian_gradient_product
from winnow.schedules import LayerCollapseWarning, prune_at_init


@pytest.fixture(scope="module")
def data():
    return winnow.data.load("synthetic", n_train=400, n_test=100, input_shape=(1, 8, 8))


FAST = {
    "obd": {"samples": 32},
    "woodfisher": {"samples": 32, "block_size": 4},
    "taylor": {"samples": 32},
}
"""Options that keep the after-training criteria quick on the generic tests (per-sample
gradients cost one backward pass each; WoodFisher's inverse grows with the block size)."""


def small_mlp(seed=0, hidden=(16, 16)):
    return models.create("mlp", input_size=8, num_classes=4, hidden=list(hidden), seed=seed)


def test_snip_equals_abs_grad_times_weight(data):
    model = small_mlp()
    x, y = data.x_train[:64], data.y_train[:64]
    scores = criteria.score(model, "snip", (x, y), samples=64)
    params = prunable_parameters(model)
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, p), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(scores[name], (g * p).abs(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("chunks", [1, 3])
def test_grasp_hessian_gradient_product_matches_central_difference(data, chunks):
    model = small_mlp().double()
    x, y = data.x_train[:48].double(), data.y_train[:48]
    params = dict(model.named_parameters())
    weights = {n: p for n, p in params.items() if n.endswith("weight")}
    batches = list(zip(x.chunk(chunks), y.chunk(chunks), strict=True))
    g, hg = hessian_gradient_product(model, weights, batches, temperature=2.0)

    def grad_at(shift):
        with torch.no_grad():
            for n, p in weights.items():
                p.add_(shift * g[n])
        loss = nn.functional.cross_entropy(model(x) / 2.0, y)
        out = torch.autograd.grad(loss, list(weights.values()))
        with torch.no_grad():
            for n, p in weights.items():
                p.sub_(shift * g[n])
        return dict(zip(weights, out, strict=True))

    eps = 1e-4
    plus, minus = grad_at(eps), grad_at(-eps)
    for n in weights:
        estimate = (plus[n] - minus[n]) / (2 * eps)
        torch.testing.assert_close(hg[n], estimate, rtol=1e-3, atol=1e-7)


def test_grasp_sign_removing_pruned_set_lowers_gradient_norm_least(data):
    """First-order statement of GraSP: removing the weights it prunes changes ‖g‖² the least
    negatively, removing the weights it keeps the most, a random set in between."""
    model = small_mlp(seed=1, hidden=(32, 32)).double()
    x, y = data.x_train[:100].double(), data.y_train[:100]
    scores = criteria.score(model, "grasp", (x, y), samples=100, temperature=1.0)
    flat = torch.cat([s.flatten() for s in scores.values()])
    count = max(1, int(0.005 * flat.numel()))

    def norm_after_removing(chosen):
        pruned = copy.deepcopy(model)
        params = prunable_parameters(pruned)
        offset = 0
        with torch.no_grad():
            for p in params.values():
                p.view(-1)[chosen[offset : offset + p.numel()]] = 0
                offset += p.numel()
        loss = nn.functional.cross_entropy(pruned(x), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        return float(sum((g**2).sum() for g in grads))

    def indicator(index):
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[index] = True
        return mask

    order = torch.argsort(flat)
    grasp_prunes = indicator(order[:count])  # lowest score = highest S(-θ)
    grasp_keeps = indicator(order[-count:])
    gen = torch.Generator().manual_seed(0)
    random_norms = [
        norm_after_removing(indicator(torch.randperm(flat.numel(), generator=gen)[:count]))
        for _ in range(5)
    ]
    after_prune = norm_after_removing(grasp_prunes)
    after_keep = norm_after_removing(grasp_keeps)
    assert after_prune > max(random_norms)
    assert after_keep < min(random_norms)


def test_synflow_is_data_free_and_deterministic(data):
    model = models.create("vgg11", input_size=8, num_classes=4)
    a = criteria.score(model, "synflow", data)
    b = criteria.score(model, "synflow", input_shape=(1, 8, 8))
    other = (torch.randn(5, 1, 8, 8), torch.randint(0, 4, (5,)))
    c = criteria.score(model, "synflow", other)
    for n in a:
        assert torch.equal(a[n], b[n]) and torch.equal(a[n], c[n])
        assert a[n].dtype == torch.float32 and bool((a[n] >= 0).all())
    with pytest.raises(ValueError, match="input_shape"):
        criteria.score(model, "synflow")


@pytest.mark.parametrize("name", ["vgg19", "resnet56"])
def test_synflow_stays_finite_on_deep_networks(name):
    model = models.create(name, input_size=32, in_channels=3)
    scores = criteria.score(model, "synflow", input_shape=(3, 32, 32))
    flat = torch.cat([s.flatten() for s in scores.values()])
    assert torch.isfinite(flat).all() and bool((flat > 0).any())
    # ResNet-56's flow overflows float32 and is recomputed in float64
    assert flat.dtype == (torch.float64 if name == "resnet56" else torch.float32)


def test_synflow_float32_and_float64_rank_alike():
    model = models.create("vgg11", input_size=16)
    low = criteria.score(model, "synflow", input_shape=(1, 16, 16), dtype=torch.float32)
    high = criteria.score(model, "synflow", input_shape=(1, 16, 16), dtype=torch.float64)
    for n in low:
        torch.testing.assert_close(low[n].double(), high[n], rtol=1e-3, atol=0)


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("method", criteria.available())
def test_no_criterion_changes_the_model(method, mode, data):
    model = models.create("vgg11", input_size=8, num_classes=4)
    model.train(mode == "train")
    model.features[1].weight.requires_grad_(False)  # a frozen BatchNorm weight
    before = _snapshot(model)
    criteria.score(model, method, data, **FAST.get(method, {}))
    after = _snapshot(model)
    assert before[0].keys() == after[0].keys()
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key]), key
    assert before[1] == after[1] and before[2] == after[2]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", criteria.available())
def test_same_seed_same_masks(method, data):
    masks = [
        prune_at_init(
            small_mlp(),
            method,
            0.1,
            data,
            rounds=3 if method == "synflow" else None,
            **FAST.get(method, {}),
        )
        for _ in range(2)
    ]
    assert masks[0] == masks[1]
    assert masks[0].num_kept() == round(0.1 * masks[0].numel())


def test_masked_scoring_scores_the_pruned_network(data):
    model = small_mlp()
    masks = prune_at_init(model, "magnitude", 0.3)
    scores = criteria.score(model, "snip", data, masks=masks)
    for name, mask in masks.items():
        assert bool((scores[name][~mask] == 0).all())


def test_layer_collapse_synflow_vs_one_shot():
    """Tanaka et al. 2020: at extreme sparsity, one-shot magnitude / SNIP cut a layer of a deep
    narrow network, iterative SynFlow keeps it connected."""
    model = models.create("mlp", input_size=16, num_classes=10, hidden=[100] * 10, seed=0)
    data = winnow.data.load(
        "synthetic", n_train=256, n_test=16, input_shape=(1, 16, 16), num_classes=10
    )
    density = 0.001
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerCollapseWarning)
        magnitude = prune_at_init(model, "magnitude", density)
        snip = prune_at_init(model, "snip", density, data)
    assert magnitude.collapsed_layers() and not is_connected(magnitude)
    assert snip.collapsed_layers() and not is_connected(snip)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayerCollapseWarning)
        synflow = prune_at_init(model, "synflow", density, data, rounds=100)
    assert synflow.collapsed_layers() == [] and is_connected(synflow)
    with pytest.warns(LayerCollapseWarning, match="layers.1.weight"):
        prune_at_init(model, "magnitude", density)


def test_prune_at_init_errors(data):
    model = small_mlp()
    with pytest.raises(ValueError, match="unknown criterion 'snap'"):
        prune_at_init(model, "snap", 0.1, data)
    with pytest.raises(ValueError, match="needs data"):
        prune_at_init(model, "snip", 0.1)
    with pytest.raises(ValueError, match="density"):
        prune_at_init(model, "magnitude", 1.2)
    with pytest.raises(ValueError, match="no prunable layer"):
        prune_at_init(nn.Sequential(nn.ReLU()), "magnitude", 0.1)
    with pytest.raises(ValueError, match="unknown bn_mode 'test'"):
        prune_at_init(model, "snip", 0.1, data, bn_mode="test")


def test_iterative_from_existing_masks(data):
    model = small_mlp()
    half = prune_at_init(model, "magnitude", 0.5)
    tenth = prune_at_init(model, "snip", 0.1, data, rounds=3, masks=half)
    assert tenth.num_kept() == round(0.1 * tenth.numel())
    assert (tenth & ~half).num_kept() == 0  # nothing revived
    with pytest.raises(ValueError, match="above the starting mask"):
        prune_at_init(model, "magnitude", 0.6, masks=half)


@pytest.mark.parametrize("method,scope", [("synflow", "global"), ("snip", "layer")])
def test_iterative_pruning_equals_rescoring_from_scratch(method, scope):
    """Each round of prune_at_init (compact survivors, only the weights just removed zeroed)
    gives the masks of scoring the masked network afresh and selecting, round after round."""
    data = winnow.data.load("synthetic", n_train=64, n_test=8, input_shape=(1, 28, 28))
    model = models.create("lenet5", seed=3)
    got = prune_at_init(model, method, 0.02, data, rounds=6, scope=scope)
    current = None
    for target in winnow.core.exponential_densities(0.02, 6):
        options = {"input_shape": (1, 28, 28)} if method == "synflow" else {"data": data}
        scores = criteria.score(model, method, masks=current, **options)
        current = winnow.core.selection.select(scores, target, scope=scope, current=current)
    assert got == current


def test_synflow_channels_last_copy_gives_the_same_scores():
    model = models.create(
        "vgg11", in_channels=3, input_size=32, widths=[8, 16, 16, 16, 32, 32, 32, 32]
    )
    fast = criteria.score(model, "synflow", input_shape=(3, 32, 32), channels_last=True)
    plain = criteria.score(model, "synflow", input_shape=(3, 32, 32), channels_last=False)
    for name, values in plain.items():
        assert fast[name].shape == values.shape
        torch.testing.assert_close(fast[name], values, rtol=1e-4, atol=1e-6 * values.max())
    masks = prune_at_init(model, "synflow", 0.05, rounds=5, input_shape=(3, 32, 32))
    reference = prune_at_init(
        model, "synflow", 0.05, rounds=5, input_shape=(3, 32, 32), channels_last=False
    )
    assert masks.num_kept() == reference.num_kept()
    assert masks.layer_density() == pytest.approx(reference.layer_density(), abs=0.01)


class UserNet(nn.Module):
    """A user's own module: conv, BatchNorm, a residual addition, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + torch.relu(self.branch(h))
        return self.head(h.mean((2, 3)))


def _inputs(shape, classes, n=8):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=gen), torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("name", models.available())
def test_every_criterion_scores_every_zoo_model(name):
    one_d = name.endswith("1d")
    shape = (1, 40) if one_d else (1, 16, 16)
    model = models.create(name, input_size=40 if one_d else 16, num_classes=3)
    data = _inputs(shape, 3)
    big = sum(p.numel() for p in prunable_parameters(model).values()) > 5_000_000
    for method in criteria.available():
        if method == "woodfisher" and big:
            continue  # its inverse grows as weights x block size: tested on the smaller models
        scores = criteria.score(model, method, data, **FAST.get(method, {}))
        params = prunable_parameters(model)
        assert list(scores) == list(params)
        for n, p in params.items():
            assert scores[n].shape == p.shape and bool(torch.isfinite(scores[n]).all()), (method, n)


def test_criteria_on_a_users_module():
    model = UserNet()
    data = _inputs((1, 8, 8), 3)
    for method in criteria.available():
        masks = prune_at_init(model, method, 0.3, data, rounds=2, **FAST.get(method, {}))
        assert list(masks) == ["stem.weight", "branch.weight", "head.weight"]
        assert masks.num_kept() == round(0.3 * masks.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("positions_layout", ["default", "storage"])
def test_zeroing_the_pruned_weights_in_any_layout(dtype, positions_layout):
    """Iterative pruning zeroes exactly the weights just removed, given as positions in the
    default layout or in the channels-last storage, in any float dtype (bfloat16: numpy has
    none, the storage is written as integers)."""
    import numpy as np

    from winnow.core._layout import storage_offsets
    from winnow.core._topk import zero_removed as _zero

    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(6, 4, 3, 3, generator=gen).to(dtype)
    params = {
        "conv": nn.Parameter(conv.to(memory_format=torch.channels_last)),
        "fc": nn.Parameter(torch.randn(5, 7, generator=gen).to(dtype)),
    }
    flat = {"conv": np.array([0, 5, 17, 100, 215]), "fc": np.array([3, 4, 34])}
    strides = {"conv": (36, 9, 3, 1), "fc": (7, 1)}
    if positions_layout == "storage":
        strides["conv"] = params["conv"].stride()
        flat_conv = storage_offsets(flat["conv"], conv.shape, strides["conv"])
    else:
        flat_conv = flat["conv"]
    expected = {n: p.detach().clone().reshape(-1) for n, p in params.items()}
    for name, where in flat.items():
        expected[name][torch.from_numpy(where)] = 0
    removed = {
        "conv": torch.from_numpy(flat_conv.astype(np.int64)),
        "fc": torch.from_numpy(flat["fc"]),
    }
    _zero(params, removed, strides)
    assert params["conv"].is_contiguous(memory_format=torch.channels_last)
    for name, param in params.items():
        assert torch.equal(param.detach().reshape(-1), expected[name]), name
