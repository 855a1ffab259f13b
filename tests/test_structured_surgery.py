"""Surgery: the smaller network equals the masked original, rebuilds from its spec, exports."""

import io
import json

import pytest
import torch
from torch import nn

from winnow.structured import (
    analyse,
    apply_channel_masks,
    count,
    count_analysis,
    find_groups,
    load,
    rebuild,
    save,
    shrink,
    zoo_spec,
)

pytestmark = pytest.mark.usefixtures("one_thread")


ZOO = [
    ("lenet5", {}, (1, 28, 28), False),
    ("conv2", {}, (1, 16, 16), False),
    ("vgg11", {"widths": [8, 16, 16, 16, 24, 24, 24, 24]}, (1, 28, 28), False),
    ("resnet20", {"width": 4}, (3, 16, 16), False),
    ("resnet20", {"width": 4}, (3, 16, 16), True),  # residual-tied channels pruned too
    ("mlp", {"hidden": [32, 24]}, (1, 8, 8), False),
    ("cnn1d", {"channels": 12}, (1, 40), False),
]


def nontrivial_batchnorm(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(n, generator=gen) - 0.5)


def random_masks(model, shape, include_tied=False, seed=0, keep=0.5):
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for group in analyse(model, shape).prunable(include_tied):
        mask = torch.rand(group.size, generator=gen) < keep
        mask[torch.randint(group.size, (1,), generator=gen)] = True
        masks[group.name] = mask
    return masks


def check_shrink(model, masks, shape, spec=None, base=None):
    model.eval()
    small, small_spec = shrink(model, masks, shape, spec)
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    masked = apply_channel_masks(model, masks, shape).eval()
    with torch.no_grad():
        reference = masked(x)
        assert (small(x) - reference).abs().max() <= 1e-5
        # the spec is JSON and rebuilds the architecture; the state dict loads into it
        restored = rebuild(json.loads(json.dumps(small_spec)), base=base)
        restored.load_state_dict(small.state_dict())
        assert (restored.eval()(x) - reference).abs().max() <= 1e-5
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in model.parameters())
    # the analytic count of the structure is the count of the network surgery built
    widths = {k: int(v.sum()) for k, v in masks.items()}
    predicted = count_analysis(analyse(model, shape), widths)
    actual = count(small, shape)
    assert (predicted.macs, predicted.elementwise, predicted.params) == (
        actual.macs,
        actual.elementwise,
        actual.params,
    )
    assert actual.params == n_small
    return small, small_spec


@pytest.mark.parametrize(("name", "options", "shape", "tied"), ZOO)
def test_zoo_models_shrink_exactly(name, options, shape, tied):
    spec = zoo_spec(name, 10, shape[0], list(shape[1:]), **options)
    model = rebuild(spec, seed=3)
    nontrivial_batchnorm(model)
    masks = random_masks(model, shape, include_tied=tied)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    small, small_spec = check_shrink(model, masks, shape, spec)
    for key, value in model.state_dict().items():  # the model given is not changed
        assert torch.equal(value, original[key])
    assert type(small) is type(model)
    assert small_spec["model"] == name


def test_zoo_widths_go_into_the_builder_options():
    spec = zoo_spec("vgg11", 10, 1, 28, widths=[8, 16, 16, 16, 24, 24, 24, 24])
    model = rebuild(spec)
    masks = {g.name: torch.arange(g.size) < 3 for g in analyse(model, (1, 28, 28)).prunable()}
    _, small_spec = shrink(model, masks, spec=spec)
    assert small_spec["options"] == {"widths": [3] * 8}
    assert small_spec["resize"] == {}

    spec = zoo_spec("resnet20", 10, 3, 16, width=4)
    model = rebuild(spec)
    masks = {g.name: torch.arange(g.size) < 2 for g in analyse(model, (3, 16, 16)).prunable()}
    _, small_spec = shrink(model, masks, spec=spec)
    assert small_spec["options"] == {"width": 4, "inner_widths": [2] * 9}
    assert small_spec["resize"] == {}


def user_sequential() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(12, 10, 3, bias=False), nn.BatchNorm2d(10), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(10 * 2 * 2, 16),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(16, 5),
    )


def test_user_sequential_shrinks_and_rebuilds_from_a_layer_list():
    torch.manual_seed(0)
    model = user_sequential()
    nontrivial_batchnorm(model)
    shape = (3, 8, 8)
    groups = find_groups(model, shape)
    assert [g.name for g in groups] == ["0", "4.0", "6", "9"]
    assert groups[1].consumers == (("6", 4),)  # flatten: each channel feeds 2 x 2 features
    masks = random_masks(model, shape, seed=2)
    _, spec = check_shrink(model, masks, shape)
    assert [layer["type"] for layer in spec["sequential"]][:4] == [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "MaxPool2d",
    ]
    assert spec["sequential"][0]["args"]["out_channels"] == int(masks["0"].sum())


class Residual(nn.Module):
    """A user's residual network (not a Sequential, not from the zoo)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.inner = nn.Conv2d(8, 6, 3, padding=1)
        self.outer = nn.Conv2d(6, 8, 1, bias=False)
        self.outer_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        y = self.outer_bn(self.outer(torch.relu(self.inner(x))))
        x = torch.relu(x + y)
        return self.head(x.mean((2, 3)))


def test_custom_residual_module_prunes_tied_channels_consistently():
    torch.manual_seed(0)
    model = Residual()
    nontrivial_batchnorm(model)
    shape = (2, 6, 6)
    groups = {g.name: g for g in find_groups(model, shape)}
    assert groups["stem"].producers == ("stem", "outer") and groups["stem"].tied
    assert groups["stem"].consumers == (("inner", 1), ("head", 1))
    assert not groups["inner"].tied and groups["inner"].gate_after == ("inner",)
    masks = random_masks(model, shape, include_tied=True, seed=4)
    small, spec = check_shrink(model, masks, shape, base=Residual())
    assert set(spec) == {"format", "resize"}
    assert small.outer.out_channels == small.stem.out_channels == int(masks["stem"].sum())
    with pytest.raises(ValueError, match="base"):
        rebuild(spec)


def test_groups_that_cannot_be_pruned_exactly_say_why():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.Sigmoid(),  # sigmoid(0) = 0.5: a removed channel would not be zero
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # BatchNorm after the activation
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 2),
    )
    groups = find_groups(model, (1, 8, 8))
    assert "Sigmoid" in groups[0].reason
    assert "BatchNorm 4" in groups[1].reason
    assert "output" in groups[2].reason
    with pytest.raises(ValueError, match="cannot be pruned"):
        shrink(model, {"0": torch.tensor([True, False, True, True])}, (1, 8, 8))


def test_bad_masks_are_rejected():
    model = user_sequential()
    shape = (3, 8, 8)
    with pytest.raises(ValueError, match="keeps no channel"):
        shrink(model, {"0": torch.zeros(12, dtype=torch.bool)}, shape)
    with pytest.raises(ValueError, match="shape"):
        shrink(model, {"0": torch.ones(5, dtype=torch.bool)}, shape)
    with pytest.raises(KeyError):
        shrink(model, {"nope": torch.ones(12, dtype=torch.bool)}, shape)


def test_save_and_load_without_pickle(tmp_path):
    spec = zoo_spec("vgg11", 10, 1, 28, widths=[8, 16, 16, 16, 24, 24, 24, 24])
    model = rebuild(spec)
    nontrivial_batchnorm(model)
    small, small_spec = shrink(model, random_masks(model, (1, 28, 28)), spec=spec)
    path = save(tmp_path / "small.safetensors", small, small_spec)
    restored, restored_spec = load(path)
    assert restored_spec == small_spec
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), small.eval()(x))


def test_train_mode_matches_too():
    torch.manual_seed(0)
    model = user_sequential()
    nontrivial_batchnorm(model)
    shape = (3, 8, 8)
    masks = random_masks(model, shape, seed=5)
    small, _ = shrink(model, masks, shape)
    masked = apply_channel_masks(model, masks, shape)
    x = torch.randn(8, *shape)
    # Dropout draws differently in the two networks: compare with it off
    small[8].p = masked.get_submodule("8").p = 0.0
    assert (small.train()(x) - masked.train()(x)).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export():
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package")
    spec = zoo_spec("resnet20", 10, 3, 16, width=4)
    model = rebuild(spec).eval()
    small, _ = shrink(model, random_masks(model, (3, 16, 16)), spec=spec)
    small.eval()
    x = torch.randn(2, 3, 16, 16)
    buffer = io.BytesIO()
    try:
        torch.onnx.export(small, (x,), buffer, dynamo=False, input_names=["x"])
    except (ImportError, ModuleNotFoundError) as err:  # exporter dependencies missing
        pytest.skip(f"ONNX exporter unavailable: {err}")
    ort = pytest.importorskip("onnxruntime", reason="numerical check needs onnxruntime")
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(out) - small(x)).abs().max() <= 1e-4


class Reductions(nn.Module):
    """A spatial mean keeps the channels; a mean over the channels does not."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.b = nn.Conv2d(1, 6, 3, padding=1)
        self.head = nn.Linear(6 + 6, 2)

    def forward(self, x):
        spatial = self.a(x).mean((2, 3))
        across = self.b(x).mean(1)  # (N, 6, 6): shape (N, 6) in its first two dimensions
        return self.head(torch.cat([spatial, across.flatten(1)[:, :6]], 1))


def test_reductions_over_channels_are_not_channel_preserving():
    groups = {g.name: g for g in find_groups(Reductions(), (1, 6, 6))}
    assert "mean" in groups["b"].reason
    assert "cat" in groups["a"].reason  # a concatenation is not supported either
