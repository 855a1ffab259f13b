"""Surgery: channel masks in, a smaller dense network out, with a spec to rebuild it.

A masked network is not faster; only a smaller one is. :func:`shrink` removes the masked
channels physically: a producer loses output channels (weight rows, bias entries), its
BatchNorm the same entries (affine parameters and running statistics), and every consumer the
matching input channels (for a Linear after a flatten, the ``H*W`` features of each channel).
A group tied by residual additions loses the same channels in every layer writing into the
sum. The result computes what the masked original computes (see
:func:`winnow.structured.apply_channel_masks`), up to float rounding.

The smaller network is a plain ``nn.Module`` of the same class (no hooks, no wrappers). It is
saved as a ``state_dict`` plus a small JSON **spec** of its architecture, never as a pickled
module. Three kinds of spec (``"format": "winnow.structured/1"`` in each):

- a zoo model: ``{"model": "vgg11", "num_classes": 10, "in_channels": 1, "input_size": [28,
  28], "options": {"widths": [...]}, "resize": {}}``; widths the zoo builder takes go into
  ``options`` (VGG ``widths``, ResNet ``inner_widths``, ``mlp`` ``hidden``); any other change
  is a ``resize`` entry;
- an ``nn.Sequential`` of standard layers: ``{"sequential": [{"name": "0", "type": "Conv2d",
  "args": {...}}, ...], "resize": {}}`` listing the layers and their constructor arguments;
- any other module: ``{"resize": {"layer1.conv": {"in_channels": 3, "out_channels": 12},
  ...}}``, the layers whose sizes changed; :func:`rebuild` then needs the dense module
  (``base``) to apply them to.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from winnow import models
from winnow.core.modules import replace_submodule
from winnow.structured.dependency import CONVS, NORMS, Analysis, analyse

SPEC_FORMAT = "winnow.structured/1"

_CONV_ARGS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "bias",
    "padding_mode",
)
_NORM_ARGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode")
LAYER_ARGS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv1d: _CONV_ARGS,
    nn.Conv2d: _CONV_ARGS,
    nn.Conv3d: _CONV_ARGS,
    nn.Linear: ("in_features", "out_features", "bias"),
    nn.BatchNorm1d: _NORM_ARGS,
    nn.BatchNorm2d: _NORM_ARGS,
    nn.BatchNorm3d: _NORM_ARGS,
    nn.ReLU: ("inplace",),
    nn.ReLU6: ("inplace",),
    nn.LeakyReLU: ("negative_slope", "inplace"),
    nn.ELU: ("alpha", "inplace"),
    nn.GELU: ("approximate",),
    nn.SiLU: ("inplace",),
    nn.Tanh: (),
    nn.Sigmoid: (),
    nn.MaxPool1d: (*_POOL_ARGS, "dilation"),
    nn.MaxPool2d: (*_POOL_ARGS, "dilation"),
    nn.AvgPool1d: (*_POOL_ARGS, "count_include_pad"),
    nn.AvgPool2d: (*_POOL_ARGS, "count_include_pad", "divisor_override"),
    nn.AdaptiveAvgPool1d: ("output_size",),
    nn.AdaptiveAvgPool2d: ("output_size",),
    nn.AdaptiveMaxPool1d: ("output_size",),
    nn.AdaptiveMaxPool2d: ("output_size",),
    nn.Flatten: ("start_dim", "end_dim"),
    nn.Dropout: ("p",),
    nn.Dropout1d: ("p",),
    nn.Dropout2d: ("p",),
    nn.Identity: (),
}
"""Standard layers a sequential spec can hold, with the constructor arguments it stores."""

SIZE_ARGS: dict[type[nn.Module], tuple[str, ...]] = {
    **{c: ("in_channels", "out_channels") for c in CONVS},
    nn.Linear: ("in_features", "out_features"),
    **{n: ("num_features",) for n in NORMS},
}
"""The constructor arguments surgery changes, per layer type."""

_LAYER_TYPES = {cls.__name__: cls for cls in LAYER_ARGS}


# -- specs ---------------------------------------------------------------------------------------
def zoo_spec(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | Sequence[int] = 28,
    **options: Any,
) -> dict[str, Any]:
    """The spec of a dense zoo model, as :func:`winnow.models.create` takes its arguments.

    An int ``input_size`` means a square image, or a sequence length for the 1-D models
    (names ending in ``1d``).
    """
    if name not in models.available():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(models.available())}")
    if isinstance(input_size, int):
        input_size = [input_size] if name.endswith("1d") else [input_size, input_size]
    return _jsonable(
        {
            "format": SPEC_FORMAT,
            "model": name,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": list(input_size),
            "options": dict(options),
            "resize": {},
        }
    )


def spec_for(name: str, data, **options: Any) -> dict[str, Any]:
    """:func:`zoo_spec` for a dataset (classes, channels and input size from ``data``)."""
    if not hasattr(data, "num_classes") or not hasattr(data, "input_shape"):
        raise ValueError(
            f"building the zoo model {name!r} needs a DataSplits (its classes and input shape); "
            "with other data pass the model itself"
        )
    channels, *size = data.input_shape
    return zoo_spec(name, data.num_classes, channels, list(size), **options)


def spec_input_shape(spec: Mapping[str, Any]) -> tuple[int, ...]:
    """The per-sample input shape ``(C, *size)`` of a zoo spec."""
    if "model" not in spec:
        raise ValueError("only a zoo spec knows its input shape; pass input_shape")
    return (int(spec["in_channels"]), *(int(s) for s in spec["input_size"]))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _native(value: Any) -> Any:
    """JSON values back to constructor arguments: lists become tuples."""
    if isinstance(value, list):
        return tuple(_native(v) for v in value)
    return value


def _constructor_args(module: nn.Module) -> dict[str, Any]:
    args = {}
    for name in LAYER_ARGS[type(module)]:
        if name == "bias":
            args[name] = module.bias is not None
        else:
            args[name] = getattr(module, name)
    return args


def _is_standard(module: nn.Module) -> bool:
    if type(module) is nn.Sequential:
        return all(_is_standard(child) for child in module.children())
    return type(module) in LAYER_ARGS


def _layers(sequential: nn.Sequential) -> list[dict[str, Any]]:
    out = []
    for name, child in sequential.named_children():
        if type(child) is nn.Sequential:
            out.append({"name": name, "type": "Sequential", "layers": _layers(child)})
        else:
            args = _jsonable(_constructor_args(child))
            out.append({"name": name, "type": type(child).__name__, "args": args})
    return out


def _build_sequential(layers: Sequence[Mapping[str, Any]]) -> nn.Sequential:
    sequential = nn.Sequential()
    for layer in layers:
        if layer["type"] == "Sequential":
            child: nn.Module = _build_sequential(layer["layers"])
        elif layer["type"] in _LAYER_TYPES:
            args = {k: _native(v) for k, v in layer.get("args", {}).items()}
            child = _LAYER_TYPES[layer["type"]](**args)
        else:
            raise ValueError(f"a sequential spec cannot hold a {layer['type']!r} layer")
        sequential.add_module(str(layer["name"]), child)
    return sequential


def _zoo_options(small: nn.Module, name: str) -> dict[str, Any]:
    """The widths of a pruned zoo model that its builder takes as options."""
    if isinstance(small, models.VGG):
        return {"widths": [m.out_channels for m in small.features if isinstance(m, nn.Conv2d)]}
    if isinstance(small, models.ResNet):
        blocks = [b for stage in (small.layer1, small.layer2, small.layer3) for b in stage]
        return {"inner_widths": [b.conv1.out_channels for b in blocks]}
    if isinstance(small, models.MLP) and name == "mlp":
        linears = [m for m in small.layers if isinstance(m, nn.Linear)]
        return {"hidden": [m.out_features for m in linears[:-1]]}
    return {}


def _resize_entries(base: nn.Module, small: nn.Module) -> dict[str, dict[str, int]]:
    """The layers of ``small`` whose sizes differ from those of the same name in ``base``."""
    resize = {}
    for name, module in small.named_modules():
        keys = SIZE_ARGS.get(type(module))
        if not keys:
            continue
        sizes = {k: getattr(module, k) for k in keys}
        if sizes != {k: getattr(base.get_submodule(name), k) for k in keys}:
            resize[name] = sizes
    return resize


def describe(
    small: nn.Module, dense: nn.Module, spec: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The spec of ``small``, a pruned version of ``dense`` (see the module docstring).

    ``spec`` is the dense model's zoo spec (:func:`zoo_spec`), if it comes from the zoo.
    """
    if spec is not None and "model" in spec:
        options = {**spec.get("options", {}), **_zoo_options(small, spec["model"])}
        out = _jsonable({**spec, "options": options, "resize": {}})
        with torch.device("meta"):
            base = rebuild(out)
        out["resize"] = _resize_entries(base, small)
    elif _is_standard(small):
        out = {"format": SPEC_FORMAT, "sequential": _layers(small), "resize": {}}
    else:
        out = {"format": SPEC_FORMAT, "resize": _resize_entries(dense, small)}
    with torch.device("meta"):
        check = rebuild(out, base=dense)
    expected = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    if {k: tuple(v.shape) for k, v in check.state_dict().items()} != expected:
        raise RuntimeError("the spec does not rebuild the pruned architecture (a winnow bug)")
    return out


def _zoo_init(model: nn.Module, module: nn.Module) -> None:
    """Initialise a resized layer as the zoo initialises that model's layers."""
    if isinstance(model, (models.VGG, models.ResNet)):
        models._init_kaiming(module)
    elif isinstance(model, (models.MLP, models.LeNet5, models.ConvNet, models.ConvNet1d)):
        models._init_glorot(module)


def rebuild(spec: Mapping[str, Any], base: nn.Module | None = None, seed: int = 0) -> nn.Module:
    """A freshly initialised network of the architecture ``spec`` describes.

    Zoo specs go through :func:`winnow.models.create` (seeded with ``seed``), sequential specs
    build their layers, and other specs resize the layers of a copy of ``base`` (the dense
    module; required then). Resized layers are initialised as the zoo initialises that
    model (Glorot or Kaiming), or with PyTorch's defaults outside the zoo, under ``seed``.
    ``rebuild(spec).load_state_dict(small.state_dict())`` restores a pruned network.
    """
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"not a {SPEC_FORMAT} spec: format {spec.get('format')!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if "model" in spec:
            model = models.create(
                spec["model"],
                num_classes=int(spec["num_classes"]),
                in_channels=int(spec["in_channels"]),
                input_size=tuple(int(s) for s in spec["input_size"]),
                seed=seed,
                **{k: _native(v) for k, v in spec.get("options", {}).items()},
            )
        elif "sequential" in spec:
            model = _build_sequential(spec["sequential"])
        elif base is not None:
            model = copy.deepcopy(base)
        else:
            raise ValueError("this spec resizes a custom module: pass the dense module as base")
        for name, sizes in spec.get("resize", {}).items():
            old = model.get_submodule(name)
            new = _resized(old, {k: int(v) for k, v in sizes.items()})
            _zoo_init(model, new)
            replace_submodule(model, name, new)
    return model


# -- surgery -------------------------------------------------------------------------------------
def _resized(module: nn.Module, sizes: Mapping[str, int]) -> nn.Module:
    """A new layer like ``module`` with other sizes, on the same device and dtype."""
    if type(module) not in SIZE_ARGS:
        raise ValueError(f"cannot resize a {type(module).__name__}")
    args = {**_constructor_args(module), **sizes}
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    if tensor is not None and tensor.is_floating_point():
        args.update(device=tensor.device, dtype=tensor.dtype)
    new = type(module)(**args)
    new.train(module.training)
    return new


@torch.no_grad()
def _cut(module: nn.Module, out: Tensor | None, inp: Tensor | None) -> nn.Module:
    """``module`` keeping only the output indices ``out`` and input indices ``inp``."""
    kind = type(module)
    if kind in NORMS:
        new = _resized(module, {"num_features": len(out)})
        state = {
            k: (v[out] if k != "num_batches_tracked" else v) for k, v in module.state_dict().items()
        }
        new.load_state_dict(state)
    else:
        out_key, in_key = SIZE_ARGS[kind][1], SIZE_ARGS[kind][0]
        sizes, weight = {}, module.weight
        if out is not None:
            weight = weight[out]
            sizes[out_key] = len(out)
        if inp is not None:
            weight = weight[:, inp]
            sizes[in_key] = len(inp)
        new = _resized(module, sizes)
        new.weight.copy_(weight)
        if module.bias is not None:
            new.bias.copy_(module.bias if out is None else module.bias[out])
    for name, param in new.named_parameters():
        param.requires_grad_(module.get_parameter(name).requires_grad)
    return new


def _plan(analysis: Analysis, masks: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """For each layer to cut: its kept output indices ("out") and input indices ("in")."""
    plan: dict[str, dict[str, Tensor]] = {}
    seen: set[str] = set()
    for key, mask in masks.items():
        group = analysis.group(key)
        if group.name in seen:
            raise ValueError(f"group {group.name!r} has two masks")
        seen.add(group.name)
        if not group.prunable:
            raise ValueError(f"group {group.name!r} cannot be pruned: {group.reason}")
        mask = torch.as_tensor(mask).to("cpu", torch.bool)
        if mask.shape != (group.size,):
            raise ValueError(
                f"the mask of {group.name!r} has shape {tuple(mask.shape)}, not ({group.size},)"
            )
        if not bool(mask.any()):
            raise ValueError(f"the mask of {group.name!r} keeps no channel")
        if bool(mask.all()):
            continue
        keep = mask.nonzero().flatten()
        for name in (*group.producers, *group.norms):
            plan.setdefault(name, {})["out"] = keep
        for name, factor in group.consumers:
            features = (keep[:, None] * factor + torch.arange(factor)).flatten()
            plan.setdefault(name, {})["in"] = features
    return plan


def shrink(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    input_shape: Sequence[int] | None = None,
    spec: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The smaller dense network that computes what ``model`` computes with ``masks`` applied.

    ``masks`` maps a channel group's name (or any producer of the group; see
    :func:`winnow.structured.find_groups`) to a boolean tensor of the group's size, True for
    the channels kept; groups not named keep every channel. A group that cannot be pruned
    exactly raises ``ValueError`` with its reason, as does a mask keeping no channel.
    ``input_shape`` is one sample's shape; with a zoo ``spec`` (:func:`zoo_spec`, the dense
    model's) it is read from the spec. Returns ``(small, spec)``: ``small`` is a copy of
    ``model`` (same class, same train/eval mode, same device) with its layers cut, ``spec``
    the JSON-able description that :func:`rebuild` turns back into that architecture.
    ``model`` is not changed.
    """
    if input_shape is None:
        if spec is None:
            raise ValueError("pass input_shape (one sample's shape) or the model's zoo spec")
        input_shape = spec_input_shape(spec)
    analysis = analyse(model, input_shape)
    plan = _plan(analysis, masks)
    small = copy.deepcopy(model)
    for name, cut in plan.items():
        replace_submodule(
            small, name, _cut(small.get_submodule(name), cut.get("out"), cut.get("in"))
        )
    return small, describe(small, model, spec)


def save(path: str | os.PathLike, model: nn.Module, spec: Mapping[str, Any]) -> Path:
    """Write ``model.state_dict()`` and its ``spec`` to one checksummed safetensors file."""
    from winnow.io import save_tensors

    return save_tensors(path, model.state_dict(), metadata={"spec": _jsonable(spec)})


def load(path: str | os.PathLike, base: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Read a file written by :func:`save`: ``(model, spec)``, never unpickling anything.

    The weights are read and verified first; the architecture the stored spec describes
    (``base``: the dense module, for specs of custom modules) is then built on the meta device
    and must hold exactly the file's tensors (names and shapes) before it is built for
    real, so a small file cannot make winnow build a large model; the weights are loaded
    strictly. ``ValueError`` names any mismatch.
    """
    from winnow.io import load_tensors, tensor_metadata

    spec = tensor_metadata(path).get("spec")
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: no architecture spec in its metadata")
    tensors = load_tensors(path)
    try:
        with torch.device("meta"):
            shape = rebuild(spec, base=None if base is None else copy.deepcopy(base).to("meta"))
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(
            f"{path}: invalid architecture spec ({type(err).__name__}: {err})"
        ) from None
    expected = {k: tuple(v.shape) for k, v in shape.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        wrong = sorted(set(expected) ^ set(found)) or sorted(
            k for k in expected if expected[k] != found[k]
        )
        raise ValueError(
            f"{path}: the spec describes tensors the file does not hold (first: {wrong[:3]})"
        )
    model = rebuild(spec, base=base)
    model.load_state_dict(tensors)
    return model, spec
