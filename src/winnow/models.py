"""The papers' model zoo behind a name registry.

``create("resnet20", num_classes=10, in_channels=3, input_size=32)`` builds a seeded model.
2-D models take inputs of shape (N, C, H, W); 1-D models (``mlp1d``, ``cnn1d``) take (N, C, L).
Every model accepts any number of input channels, input size and classes; models that flatten
compute their flattened size from ``input_size`` at construction.

Initialisation follows the papers' code:

- Glorot (Xavier) normal weights and zero biases for ``lenet300``, ``lenet5``, ``conv2/4/6``,
  ``mlp1d``, ``cnn1d`` and ``mlp`` (as in the lottery-ticket code, OpenLTH).
- VGG and ResNet: Kaiming normal convolutions (fan_out, ReLU gain); convolutions followed by
  BatchNorm carry no bias (BatchNorm's shift makes it redundant); BatchNorm weight 1, bias 0;
  the Linear head keeps PyTorch's default initialisation (uniform in +-1/sqrt(fan_in) for
  weight and bias), exactly as torchvision's ResNet does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from itertools import pairwise

import torch
from torch import nn

Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder to the registry under ``name``.

    A builder is called as ``builder(num_classes, in_channels, input_size, **options)`` and
    returns an ``nn.Module``; it raises ``ValueError`` for arguments it cannot handle.
    Registering a name twice raises ``ValueError``.
    """

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def available() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | tuple[int, ...] = 28,
    seed: int | None = 0,
    **options,
) -> nn.Module:
    """Build the registered model ``name``.

    ``input_size`` is an int (the side of a square image, or the length of a sequence for 1-D
    models) or a tuple (H, W) / (L,). With an int ``seed`` the model is built inside
    ``torch.random.fork_rng`` after ``torch.manual_seed(seed)``: the same seed gives bitwise
    identical weights and the caller's global RNG is left untouched. With ``seed=None`` the
    model draws from (and advances) the global RNG, like any ``nn.Module`` constructor.
    ``options`` are passed to the builder (e.g. ``widths`` for VGG, ``inner_widths`` for
    ResNet). Raises ``ValueError`` for an unknown name or arguments the model cannot take.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    builder = _REGISTRY[name]
    try:
        for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if seed is None:
            return builder(num_classes, in_channels, input_size, **options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return builder(num_classes, in_channels, input_size, **options)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error


def create_for(name: str, data, seed: int | None = 0, **options) -> nn.Module:
    """Build ``name`` for a dataset: classes, channels and input size from ``data``.

    ``data`` is a :class:`winnow.data.DataSplits` (anything with ``num_classes`` and a
    per-sample ``input_shape`` of ``(C, H, W)`` or ``(C, L)``).
    """
    channels, *size = data.input_shape
    return create(
        name,
        num_classes=data.num_classes,
        in_channels=channels,
        input_size=tuple(size),
        seed=seed,
        **options,
    )


# --- sizes ------------------------------------------------------------------------------------


def _sizes(input_size: int | Sequence[int], dims: int | None) -> tuple[int, ...]:
    """``input_size`` as a tuple of positive ints; an int is repeated ``dims`` times (default 2)."""
    sizes = (input_size,) * (dims or 2) if isinstance(input_size, int) else tuple(input_size)
    valid = all(isinstance(s, int) and s >= 1 for s in sizes)
    if not sizes or not valid or (dims is not None and len(sizes) != dims):
        expected = f"{dims} positive int(s)" if dims else "positive ints"
        raise ValueError(f"input_size must be an int or a tuple of {expected}, got {input_size!r}")
    return sizes


def _out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution or pooling along one dimension; at least 1 or ValueError."""
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(
            f"input too small: a size of {size} leaves nothing after a kernel of {kernel}"
            f" (stride {stride}, padding {padding})"
        )
    return out


# --- initialisation ---------------------------------------------------------------------------


def _init_glorot(model: nn.Module) -> None:
    """Glorot (Xavier) normal weights and zero biases for every Linear and convolution."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _init_kaiming(model: nn.Module) -> None:
    """Kaiming normal (fan_out, ReLU) convolutions (He et al. 2015); everything else default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


# --- models -----------------------------------------------------------------------------------


class MLP(nn.Module):
    """Fully connected network: Flatten, then Linear layers with ReLU between them.

    With hidden widths [300, 100] on 28x28 images this is LeNet-300-100 (LeCun et al. 1998, as
    used by Frankle & Carbin 2019, "The Lottery Ticket Hypothesis"); with [100, 100] on
    sequences of length 40 it is the MLP of Greydanus 2020, "Scaling down deep learning"
    (MNIST-1D). Glorot normal initialisation.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if not all(isinstance(h, int) and h >= 1 for h in hidden):
            raise ValueError(f"hidden widths must be positive ints, got {list(hidden)!r}")
        widths = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in pairwise(widths):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.layers = nn.Sequential(*layers)
        _init_glorot(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) in its common modern form.

    Conv(C, 6, 5, padding 2), ReLU, MaxPool 2, Conv(6, 16, 5), ReLU, MaxPool 2, then
    Linear(-> 120), ReLU, Linear(120, 84), ReLU, Linear(84, classes). Glorot normal
    initialisation.
    """

    def __init__(self, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = (_out(_out(_out(_out(s, 5, padding=2), 2, 2), 5), 2, 2) for s in input_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h * w, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )
        _init_glorot(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ConvNet(nn.Module):
    """Conv-2, Conv-4, Conv-6 of Frankle & Carbin 2019, "The Lottery Ticket Hypothesis"
    (Figure 2, Table 1).

    For each width in ``block_widths``: two 3x3 convolutions (padding 1) with ReLU, then
    MaxPool 2; then Linear(-> 256), ReLU, Linear(256, 256), ReLU, Linear(256, classes).
    Conv-2/4/6 use block widths [64], [64, 128], [64, 128, 256]. Glorot normal initialisation.
    """

    def __init__(
        self,
        block_widths: Sequence[int],
        num_classes: int,
        in_channels: int,
        input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        h, w = input_size
        channels = in_channels
        for width in block_widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            h, w, channels = _out(h, 2, 2), _out(w, 2, 2), width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * h * w, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )
        _init_glorot(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}  # fmt: skip


class VGG(nn.Module):
    """VGG with BatchNorm (Simonyan & Zisserman 2015, configurations A, D, E), CIFAR style.

    ``config`` lists conv widths and "M" for a 2x2 max-pool. Each conv is Conv3x3 (padding 1,
    no bias) -> BatchNorm2d -> ReLU. A max-pool is skipped when the spatial size is already
    1x1 (and pools only along a dimension larger than 1), so 28x28 inputs work
    (28 -> 14 -> 7 -> 3 -> 1, last pool skipped). Then AdaptiveAvgPool2d(1), Flatten and
    ``classifier`` = Linear(last width, classes), as in the CIFAR VGGs of the
    pruning-at-initialisation papers (GraSP, SynFlow). ``widths`` overrides the conv widths
    (one per conv), so that a channel-pruned structure can be rebuilt. Kaiming normal
    (fan_out) convs; PyTorch default head.
    """

    def __init__(
        self,
        config: Sequence[int | str],
        num_classes: int,
        in_channels: int,
        input_size: tuple[int, int],
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        default_widths = [v for v in config if v != "M"]
        widths = default_widths if widths is None else list(widths)
        if len(widths) != len(default_widths) or not all(
            isinstance(v, int) and v >= 1 for v in widths
        ):
            raise ValueError(
                f"widths must be {len(default_widths)} positive ints (one per conv), got {widths!r}"
            )
        layers: list[nn.Module] = []
        h, w = input_size
        channels = in_channels
        conv_widths = iter(widths)
        for item in config:
            if item == "M":
                kernel = (min(h, 2), min(w, 2))
                if kernel != (1, 1):
                    layers.append(nn.MaxPool2d(kernel))
                    h, w = h // kernel[0], w // kernel[1]
            else:
                width = next(conv_widths)
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                ]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """Basic residual block of He et al. 2016, "Deep Residual Learning for Image Recognition".

    conv1 (3x3, ``stride``) -> bn1 -> ReLU -> conv2 (3x3) -> bn2, plus ``shortcut``, then ReLU.
    ``inner`` is conv1's output width, the only width not tied by the residual addition. The
    shortcut is the identity, or a 1x1 conv (``stride``, no bias) + BatchNorm when the shape
    changes (the paper's option B).
    """

    def __init__(self, in_planes: int, inner: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2) of He et al. 2016, "Deep Residual Learning for Image Recognition"
    (Section 4.2): ResNet-20/32/56 have n = 3/5/9.

    conv1 (3x3, ``width``) -> bn1 -> ReLU; three stages (``layer1..3``) of n ``BasicBlock``s
    with widths width, 2*width, 4*width, stride 2 at the first block of stages 2 and 3;
    AdaptiveAvgPool2d(1); ``fc`` = Linear(4*width, classes). ``inner_widths`` (one per block)
    sets each block's first-conv width, so that a channel-pruned structure can be rebuilt.
    Kaiming normal (fan_out) convs, BatchNorm weight 1 and bias 0, PyTorch default head
    (as torchvision's ResNet).
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int,
        in_channels: int,
        width: int = 16,
        inner_widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        stage_widths = [width, 2 * width, 4 * width]
        if inner_widths is None:
            inner_widths = [w for w in stage_widths for _ in range(blocks_per_stage)]
        inner_widths = list(inner_widths)
        if len(inner_widths) != 3 * blocks_per_stage or not all(
            isinstance(v, int) and v >= 1 for v in inner_widths
        ):
            raise ValueError(
                f"inner_widths must be {3 * blocks_per_stage} positive ints (one per block),"
                f" got {inner_widths!r}"
            )
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        inner = iter(inner_widths)
        in_planes = width
        stages = []
        for index, planes in enumerate(stage_widths):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_planes, next(inner), planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


class ConvNet1d(nn.Module):
    """ConvBase of Greydanus 2020, "Scaling down deep learning" (MNIST-1D).

    Conv1d(C, ch, 5, stride 2, padding 1), ReLU, Conv1d(ch, ch, 3, stride 2, padding 1), ReLU,
    Conv1d(ch, ch, 3, stride 2, padding 1), ReLU, Flatten, Linear(ch * L_out, classes), with
    L_out computed from the input length (40 -> 19 -> 10 -> 5). ``channels`` defaults to 25.
    Glorot normal initialisation.
    """

    def __init__(self, num_classes: int, in_channels: int, length: int, channels: int = 25) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        out = _out(_out(_out(length, 5, 2, 1), 3, 2, 1), 3, 2, 1)
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * out, num_classes))
        _init_glorot(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --- registry entries -------------------------------------------------------------------------


@register("lenet300")
def _lenet300(num_classes: int, in_channels: int, input_size: int | tuple[int, ...]) -> MLP:
    h, w = _sizes(input_size, 2)
    return MLP(in_channels * h * w, [300, 100], num_classes)


@register("lenet5")
def _lenet5(num_classes: int, in_channels: int, input_size: int | tuple[int, ...]) -> LeNet5:
    return LeNet5(num_classes, in_channels, _sizes(input_size, 2))


def _convnet(
    block_widths: list[int],
    num_classes: int,
    in_channels: int,
    input_size: int | tuple[int, ...],
) -> ConvNet:
    return ConvNet(block_widths, num_classes, in_channels, _sizes(input_size, 2))


def _vgg(
    config: list[int | str],
    num_classes: int,
    in_channels: int,
    input_size: int | tuple[int, ...],
    widths: Sequence[int] | None = None,
) -> VGG:
    return VGG(config, num_classes, in_channels, _sizes(input_size, 2), widths)


def _resnet(
    blocks_per_stage: int,
    num_classes: int,
    in_channels: int,
    input_size: int | tuple[int, ...],
    width: int = 16,
    inner_widths: Sequence[int] | None = None,
) -> ResNet:
    _sizes(input_size, 2)  # any image size works (global average pooling); only validate it
    return ResNet(blocks_per_stage, num_classes, in_channels, width, inner_widths)


register("conv2")(partial(_convnet, [64]))
register("conv4")(partial(_convnet, [64, 128]))
register("conv6")(partial(_convnet, [64, 128, 256]))
register("vgg11")(partial(_vgg, _VGG_CONFIGS["vgg11"]))
register("vgg16")(partial(_vgg, _VGG_CONFIGS["vgg16"]))
register("vgg19")(partial(_vgg, _VGG_CONFIGS["vgg19"]))
register("resnet20")(partial(_resnet, 3))
register("resnet32")(partial(_resnet, 5))
register("resnet56")(partial(_resnet, 9))


@register("mlp1d")
def _mlp1d(num_classes: int, in_channels: int, input_size: int | tuple[int, ...]) -> MLP:
    (length,) = _sizes(input_size, 1)
    return MLP(in_channels * length, [100, 100], num_classes)


@register("cnn1d")
def _cnn1d(
    num_classes: int, in_channels: int, input_size: int | tuple[int, ...], channels: int = 25
) -> ConvNet1d:
    (length,) = _sizes(input_size, 1)
    return ConvNet1d(num_classes, in_channels, length, channels)


@register("mlp")
def _mlp(
    num_classes: int,
    in_channels: int,
    input_size: int | tuple[int, ...],
    hidden: Sequence[int] = (100, 100),
) -> MLP:
    """Generic MLP on flattened inputs: an int size is a square image, a tuple any shape."""
    return MLP(in_channels * math.prod(_sizes(input_size, None)), list(hidden), num_classes)
