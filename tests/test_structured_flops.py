"""FLOPs and parameter counts against hand-computed numbers."""

import pytest
import torch
from torch import nn

from winnow import models
from winnow.structured import count
from winnow.structured.flops import module_cost

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


def test_small_sequential_by_hand():
    counts = count(small_net(), (1, 8, 8))
    by_name = {layer.name: layer for layer in counts.layers}
    # conv: 4 x 8 x 8 outputs, each 1 x 3 x 3 multiply-accumulates; bias 1 add per output
    assert (by_name["0"].macs, by_name["0"].elementwise, by_name["0"].params) == (2304, 256, 40)
    assert (by_name["1"].macs, by_name["1"].elementwise, by_name["1"].params) == (0, 512, 8)
    assert by_name["2"].elementwise == 256  # ReLU: one per element
    assert by_name["3"].elementwise == 4 * 64  # 2x2 max-pool: 4 reads per output
    assert by_name["4"].elementwise == 0  # flatten
    assert (by_name["5"].macs, by_name["5"].elementwise, by_name["5"].params) == (192, 3, 195)
    assert counts.macs == counts.flops == 2304 + 192
    assert counts.elementwise == 256 + 512 + 256 + 256 + 3
    assert counts.params == 40 + 8 + 195
    assert counts.uncounted == ()


def test_lenet5_by_hand():
    model = models.create("lenet5", input_size=28)
    counts = count(model, (1, 28, 28))
    conv1 = 6 * 28 * 28 * 1 * 25
    conv2 = 16 * 10 * 10 * 6 * 25
    fc = 400 * 120 + 120 * 84 + 84 * 10
    assert counts.macs == conv1 + conv2 + fc == 416_520
    biases = 6 * 28 * 28 + 16 * 10 * 10 + 120 + 84 + 10
    relus = 6 * 28 * 28 + 16 * 10 * 10 + 120 + 84
    pools = 4 * (6 * 14 * 14) + 4 * (16 * 5 * 5)
    assert counts.elementwise == biases + relus + pools
    assert counts.params == sum(p.numel() for p in model.parameters()) == 61_706
    assert counts.layer_macs() == {
        "features.0": conv1,
        "features.3": conv2,
        "classifier.1": 400 * 120,
        "classifier.3": 120 * 84,
        "classifier.5": 84 * 10,
    }


def test_vgg11_by_hand():
    model = models.create("vgg11", input_size=28)
    counts = count(model, (1, 28, 28))
    # (in, out, spatial positions): 28 -> 14 -> 7 -> 3 -> 1 (the last pool is skipped)
    convs = [
        (1, 64, 28 * 28),
        (64, 128, 14 * 14),
        (128, 256, 7 * 7),
        (256, 256, 7 * 7),
        (256, 512, 3 * 3),
        (512, 512, 3 * 3),
        (512, 512, 1),
        (512, 512, 1),
    ]
    expected = sum(cin * cout * hw * 9 for cin, cout, hw in convs) + 512 * 10
    assert counts.macs == expected == 94_828_544
    assert counts.params == sum(p.numel() for p in model.parameters())
    bn_and_relu = sum(3 * cout * hw for _, cout, hw in convs)  # BN 2 + ReLU 1 per element
    pools = 4 * (64 * 14 * 14 + 128 * 7 * 7 + 256 * 3 * 3 + 512 * 1)
    assert counts.elementwise == bn_and_relu + pools + 512 + 10  # + global pool + head bias


def test_resnet20_blocks_by_hand():
    identity = models.BasicBlock(16, 16, 16)
    counts = count(identity, (16, 8, 8))
    positions = 8 * 8
    assert counts.macs == 2 * positions * 16 * 16 * 9
    # BN 2 x 2, ReLU x 2 (after bn1 and after the sum), the residual addition x 1
    assert counts.elementwise == (4 + 2 + 1) * 16 * positions
    assert any(layer.kind == "add" for layer in counts.layers)
    assert counts.params == 2 * 16 * 16 * 9 + 2 * 2 * 16

    down = models.BasicBlock(16, 32, 32, stride=2)
    counts = count(down, (16, 8, 8))
    out = 32 * 4 * 4
    assert counts.macs == out * 16 * 9 + out * 32 * 9 + out * 16  # conv1, conv2, 1x1 shortcut

    resnet = models.create("resnet20", in_channels=3, input_size=32)
    total = count(resnet, (3, 32, 32))
    assert total.params == sum(p.numel() for p in resnet.parameters())
    assert total.uncounted == ()


def test_counting_leaves_the_model_alone():
    model = small_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count(model, (1, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_unknown_layers_are_reported():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 4), nn.Softmax(dim=1))
    counts = count(model, (1, 8, 8))
    assert counts.macs == 2 * 36 * 9 + 72 * 4
    assert any("Softmax" in item for item in counts.uncounted)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.conv(x)
        if out.sum() > 0:
            out = out + 1
        return self.relu(out)


def test_untraceable_model_falls_back_to_hooks():
    counts = count(Branchy(), (1, 5, 5))
    assert counts.macs == 2 * 3 * 3 * 9
    assert any("functional" in item for item in counts.uncounted)


def test_module_cost_follows_the_shapes():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    assert module_cost(conv, [(1, 8, 4, 4)], (1, 16, 4, 4)) == (16 * 16 * 8 * 9, 0, 16 * 8 * 9)
    # the same layer costed as if pruned to 3 inputs and 5 outputs
    assert module_cost(conv, [(1, 3, 4, 4)], (1, 5, 4, 4)) == (5 * 16 * 3 * 9, 0, 5 * 3 * 9)
    grouped = nn.Conv2d(8, 8, 3, groups=8)
    assert module_cost(grouped, [(1, 8, 6, 6)], (1, 8, 4, 4))[0] == 8 * 16 * 9
