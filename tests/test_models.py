import math

import pytest
import torch
from torch import nn

from winnow import models

ONE_D = ["cnn1d", "mlp1d"]
TWO_D = [
    "conv2", "conv4", "conv6", "lenet300", "lenet5", "mlp",
    "resnet20", "resnet32", "resnet56", "vgg11", "vgg16", "vgg19",
]  # fmt: skip
GLOROT = ["cnn1d", "conv2", "conv4", "conv6", "lenet300", "lenet5", "mlp", "mlp1d"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _input(name: str, channels: int, size: int, batch: int = 2) -> torch.Tensor:
    shape = (batch, channels, size) if name in ONE_D else (batch, channels, size, size)
    return torch.randn(shape)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_registered_model_is_covered():
    assert models.available() == sorted(ONE_D + TWO_D)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ONE_D + TWO_D)
def test_forward_shape(name, channels):
    sizes = (40, 64) if name in ONE_D else (28, 32)
    for size in sizes:
        model = models.create(name, num_classes=7, in_channels=channels, input_size=size)
        with torch.no_grad():
            assert model(_input(name, channels, size)).shape == (2, 7)


def test_tuple_input_sizes():
    for name, size, x in [
        ("lenet5", (28, 36), torch.randn(2, 1, 28, 36)),
        ("vgg11", (32, 8), torch.randn(2, 1, 32, 8)),
        ("cnn1d", (40,), torch.randn(2, 1, 40)),
        ("mlp", (40,), torch.randn(2, 1, 40)),
    ]:
        with torch.no_grad():
            assert models.create(name, input_size=size)(x).shape == (2, 10)


def test_cnn1d_flattened_size():
    assert models.create("cnn1d", input_size=40).classifier[1].in_features == 125
    assert models.create("cnn1d", input_size=40, channels=8).classifier[1].in_features == 40


def test_vgg_skips_pool_at_one_pixel():
    pools = [
        m for m in models.create("vgg19", input_size=28).features if isinstance(m, nn.MaxPool2d)
    ]
    assert len(pools) == 4  # 28 -> 14 -> 7 -> 3 -> 1, the fifth pool skipped


def test_seeding():
    a = models.create("resnet20", seed=1)
    assert _equal(a, models.create("resnet20", seed=1))
    assert not _equal(a, models.create("resnet20", seed=2))


def test_create_leaves_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    models.create("lenet5", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_seed_none_uses_global_rng():
    torch.manual_seed(3)
    a = models.create("lenet5", seed=None)
    b = models.create("lenet5", seed=None)
    assert _equal(a, models.create("lenet5", seed=3))
    assert not _equal(a, b)


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="resnet20") as info:
        models.create("resnet18")
    assert "resnet18" in str(info.value)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("lenet300", {"num_classes": 0}),
        ("lenet300", {"in_channels": 0}),
        ("lenet300", {"input_size": 0}),
        ("lenet300", {"input_size": (28, 28, 28)}),
        ("cnn1d", {"input_size": (40, 40)}),
        ("lenet5", {"input_size": 8}),
        ("conv6", {"input_size": 4}),
        ("cnn1d", {"input_size": 2}),
        ("vgg11", {"widths": [64, 128]}),
        ("resnet20", {"inner_widths": [16] * 8}),
        ("resnet20", {"width": 0}),
        ("mlp", {"hidden": [100, 0]}),
    ],
)
def test_bad_arguments(name, kwargs):
    with pytest.raises(ValueError, match=name):
        models.create(name, **kwargs)


def test_register_custom_builder(monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    @models.register("tiny")
    def tiny(num_classes, in_channels, input_size):
        return nn.Linear(in_channels, num_classes)

    assert "tiny" in models.available()
    assert models.create("tiny", num_classes=3).out_features == 3
    with pytest.raises(ValueError, match="already registered"):
        models.register("tiny")(tiny)


@pytest.mark.parametrize("name", GLOROT)
def test_glorot_init(name):
    model = models.create(name, in_channels=3, input_size=40 if name in ONE_D else 32)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    for layer in layers:
        assert torch.count_nonzero(layer.bias) == 0
    biggest = max(layers, key=lambda m: m.weight.numel())
    receptive = biggest.weight[0, 0].numel()
    fan_in, fan_out = biggest.weight.shape[1] * receptive, biggest.weight.shape[0] * receptive
    expected = math.sqrt(2 / (fan_in + fan_out))
    assert biggest.weight.std().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_kaiming_fan_out_init(name):
    model = models.create(name, in_channels=3, input_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.bias is None for conv in convs)
    conv = max(convs, key=lambda m: m.weight.numel())
    fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_vgg_widths():
    widths = [8, 16, 24, 24, 32, 32, 40, 48]
    model = models.create("vgg11", in_channels=3, input_size=32, widths=widths)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == widths
    assert [c.in_channels for c in convs] == [3, *widths[:-1]]
    assert model.classifier.in_features == 48
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_inner_widths():
    inner = [4, 5, 6, 7, 8, 9, 10, 11, 12]
    model = models.create("resnet20", in_channels=3, input_size=32, inner_widths=inner)
    blocks = [b for b in model.modules() if isinstance(b, models.BasicBlock)]
    assert [b.conv1.out_channels for b in blocks] == inner
    assert [b.conv2.in_channels for b in blocks] == inner
    assert [b.bn1.num_features for b in blocks] == inner
    assert [b.conv2.out_channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_shortcuts_and_width():
    blocks = [b for b in models.create("resnet20").modules() if isinstance(b, models.BasicBlock)]
    projections = [i for i, b in enumerate(blocks) if not isinstance(b.shortcut, nn.Identity)]
    assert projections == [3, 6]
    wide = models.create("resnet20", width=8)
    assert wide.conv1.out_channels == 8 and wide.fc.in_features == 32


def test_parameter_counts():
    assert _count(models.create("lenet300")) == 266_610
    # He et al. report 0.27M; the 1x1 projection shortcuts (option B) add 2,752 to 269,722.
    assert _count(models.create("resnet20", in_channels=3, input_size=32)) == 272_474
