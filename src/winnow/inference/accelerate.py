"""Turn masks into speed: each pruned layer runs the fastest kernel measured on this machine.

:func:`accelerate` runs the model once on the user's example input (their batch size and
sequence length), catches each prunable layer's input, and times, on that input and with the
given thread count, the layer's dense product and every sparse kernel that applies (torch's
CSR and BSR, winnow's ``csr``, ``chunk`` and, for an N:M mask, ``nm`` kernels, serial and
parallel; :mod:`winnow.inference.layers`). A kernel replaces the dense product only when its
median time is below ``margin`` × the dense median, measured in the same rounds (candidates
interleaved, so a slow moment of the machine hits them alike): a layer that does not gain
stays dense, so the model is never slower than dense by more than the timing noise. The
margin (0.9: a kernel must be 10% faster) keeps a layer dense where a kernel's lead is within
the noise of two timings.

Linear layers (and Hugging Face's ``Conv1D``, whose weight is transposed) and 1×1
convolutions are accelerated; other convolutions stay dense (stated in the report).

The choices are stored with the model: :func:`save_accelerated` writes winnow's sparse
checkpoint of the masked weights with the per-layer kernels in its metadata, and
:func:`load_accelerated` rebuilds the accelerated model from it without timing again.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from winnow.core.masks import Masks
from winnow.core.modules import replace_submodule
from winnow.core.nm import Pattern, nm_violations
from winnow.formats.checkpoint import load_sparse, save_sparse, sparse_metadata
from winnow.inference.layers import SparseConv1x1, SparseLinear, is_pointwise
from winnow.inputs import call

BSR_BLOCKS = (4, 8, 16, 32)
PATTERNS = ((2, 4), (4, 8))
ROUNDS = 7
"""Interleaved timing rounds per layer (the budget is shared among them and the candidates)."""


@dataclass
class LayerChoice:
    """What :func:`accelerate` decided for one layer, with the times it measured (µs)."""

    name: str
    shape: tuple[int, int]
    density: float
    kernel: str
    dense_us: float
    chosen_us: float
    batch: int
    candidates: dict[str, float]
    pattern: tuple[int, int] = (0, 0)

    @property
    def speedup(self) -> float:
        return self.dense_us / self.chosen_us if self.chosen_us else 1.0


def _conv1d_class(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _layers(model: nn.Module) -> dict[str, tuple[nn.Module, Tensor, Tensor | None]]:
    """Accelerable modules: name -> (module, 2-d weight (out, in), bias)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found[name] = (module, module.weight, module.bias)
        elif _conv1d_class(module):
            found[name] = (module, module.weight.t(), module.bias)
        elif is_pointwise(module):
            found[name] = (module, module.weight[:, :, 0, 0], module.bias)
    return found


def _pattern(weight: Tensor) -> tuple[int, int]:
    """The tightest N:M pattern of :data:`PATTERNS` the weight satisfies along its inputs."""
    for n, m in PATTERNS:
        if weight.shape[1] % m == 0 and nm_violations(weight != 0, Pattern(n, m), 1, "w") == 0:
            return n, m
    return 0, 0


def interleaved_medians(
    functions: Mapping[str, Callable[[], Any]], rounds: int = 7, seconds: float = 0.01
) -> dict[str, float]:
    """Median seconds per call of each function: after two warm-up calls each (compilation,
    caches, thread start), ``rounds`` rounds in which every function runs for at least
    ``seconds`` and 3 calls, so a slow moment of the machine hits them alike."""
    for function in functions.values():
        function()
        function()
    times: dict[str, list[float]] = {k: [] for k in functions}
    for _ in range(rounds):
        for key, function in functions.items():
            calls, start = 0, time.perf_counter()
            while True:
                function()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds and calls >= 3:
                    break
            times[key].append(elapsed / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def _candidates(weight: Tensor, pattern: tuple[int, int], device: torch.device) -> list[str]:
    out, inputs = weight.shape
    names = ["torch-csr"]
    names += [f"torch-bsr{b}" for b in BSR_BLOCKS if out % b == 0 and inputs % b == 0]
    if device.type == "cpu":
        for fmt in ("csr", "chunk") + (("nm",) if pattern[1] else ()):
            names += [f"{fmt}-serial", f"{fmt}-parallel"]
    elif pattern == (2, 4) and weight.dtype in (torch.float16, torch.bfloat16):
        names.append("cuda-2:4")  # tried; refused (and skipped) where the GPU lacks it
    return names


@torch.no_grad()
def accelerate(
    model: nn.Module,
    example_input: Any,
    masks: Masks | None = None,
    threads: int | None = None,
    margin: float = 0.9,
    budget: float = 0.3,
    kernels: list[str] | None = None,
) -> nn.Module:
    """A copy of ``model`` whose pruned layers run the fastest kernel measured here.

    Args:
        model: the pruned model (zeros where pruned), or a dense one with ``masks``.
        example_input: what the model is called with in use (a tensor, a tuple, or a dict of
            keyword arguments): its batch size and sequence length are the ones timed.
        masks: applied to the copy first (pruned weights set to 0).
        threads: torch's and the kernels' thread count while timing (default: as now; the
            model then runs with whatever the process uses).
        margin: a kernel replaces the dense product only if its median is below
            ``margin`` × the dense median (above 1 accepts slower kernels: for comparisons).
        budget: seconds of timing per layer (all candidates together).
        kernels: restrict the candidates to these names (e.g. ``["csr-serial"]``).

    Returns the accelerated copy (``model`` is not changed), in eval mode; its choices are
    in ``winnow.inference.choices(copy)``. Outputs equal the masked dense model's within
    float32 rounding (a different order of additions).
    """
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    fast = copy.deepcopy(model).eval()
    if masks is not None:
        masks.apply(fast)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        inputs = _layer_inputs(fast, example_input)
        choices, transposed = {}, set()
        for name, (module, weight, bias) in _layers(fast).items():
            if name not in inputs:
                continue  # not used in this forward pass
            choice, layer = _tune(name, weight, bias, inputs[name], margin, budget, kernels)
            choices[name] = choice
            if layer is not None:
                if _conv1d_class(module):
                    transposed.add(name)
                if name:
                    replace_submodule(fast, name, _wrap(module, layer))
                else:  # the model is the layer itself
                    fast = _wrap(module, layer)
    finally:
        torch.set_num_threads(previous)
    fast.winnow_choices = choices
    fast.winnow_transposed = transposed
    return fast


def _wrap(module: nn.Module, layer: SparseLinear) -> nn.Module:
    return SparseConv1x1(layer) if is_pointwise(module) else layer


def _layer_inputs(model: nn.Module, example_input: Any) -> dict[str, Tensor]:
    """Each accelerable layer's input in one forward pass (as a 2-d float tensor)."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name, (module, _, _) in _layers(model).items():
        pointwise = is_pointwise(module)

        def hook(mod, args, name=name, pointwise=pointwise):
            x = args[0]
            x = x.movedim(1, -1) if pointwise else x
            seen.setdefault(name, x.reshape(-1, x.shape[-1]).detach().clone())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        call(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _tune(name, weight, bias, x, margin, budget, allowed):
    weight = weight.detach().contiguous()
    density = float((weight != 0).float().mean())
    pattern = _pattern(weight) if density <= 0.5 else (0, 0)
    dense_layer = SparseLinear.from_weight(weight, bias, "dense")
    names = _candidates(weight, pattern, weight.device) if density < 1.0 else []
    if allowed is not None:
        names = [k for k in names if k in allowed]
    layers = {"dense": dense_layer}
    for kernel in names:
        try:
            layer = SparseLinear.from_weight(weight, bias, kernel, pattern)
            expected = F.linear(x, weight, bias)
            scale = 1.0 + float(expected.abs().max())
            tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2
            torch.testing.assert_close(layer(x), expected, rtol=tolerance, atol=tolerance * scale)
        except (RuntimeError, ValueError, NotImplementedError, AssertionError):
            continue  # not supported here (a torch build without BSR on CPU, ...)
        layers[kernel] = layer
    calls = {k: (lambda layer=layer: layer(x)) for k, layer in layers.items()}
    times = interleaved_medians(calls, ROUNDS, budget / ROUNDS / len(calls))
    sparse = {k: t for k, t in times.items() if k != "dense"}
    best = min(sparse, key=sparse.get) if sparse else "dense"
    if best != "dense" and not times[best] < margin * times["dense"]:
        best = "dense"  # no kernel beats dense by the margin
    used = pattern if best.startswith("nm") else (0, 0)
    choice = LayerChoice(
        name, tuple(weight.shape), density, best, 1e6 * times["dense"], 1e6 * times[best],
        x.shape[0], {k: 1e6 * v for k, v in times.items()}, used,
    )  # fmt: skip
    return choice, (None if best == "dense" else layers[best])


def choices(model: nn.Module) -> dict[str, LayerChoice]:
    """The per-layer decisions of an accelerated model."""
    return dict(getattr(model, "winnow_choices", {}))


def table(model: nn.Module) -> str:
    """The choices as a text table: layer, shape, density, kernel, dense µs, chosen µs."""
    rows = [f"{'layer':<40} {'shape':>11} {'density':>8} {'kernel':>15} {'dense us':>9} "
            f"{'chosen us':>9} {'speedup':>7}"]  # fmt: skip
    dense_total = chosen_total = 0.0
    for choice in choices(model).values():
        shape = f"{choice.shape[0]}x{choice.shape[1]}"
        rows.append(
            f"{choice.name:<40} {shape:>11} {choice.density:>8.3f} {choice.kernel:>15} "
            f"{choice.dense_us:>9.1f} {choice.chosen_us:>9.1f} {choice.speedup:>6.2f}x"
        )
        dense_total += choice.dense_us
        chosen_total += choice.chosen_us
    if dense_total:
        rows.append(f"{'all layers':<40} {'':>11} {'':>8} {'':>15} {dense_total:>9.1f} "
                    f"{chosen_total:>9.1f} {dense_total / chosen_total:>6.2f}x")  # fmt: skip
    return "\n".join(rows)


# -- files ------------------------------------------------------------------------------------
def _dense_state(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict the original model would have: each accelerated layer's buffers replaced
    by its masked dense weight (and bias) under the original layer's names."""
    replaced: dict[str, SparseLinear | SparseConv1x1] = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in replaced)
        if isinstance(module, (SparseLinear, SparseConv1x1)) and not inside:
            replaced[name] = module
    state = {
        key: value
        for key, value in model.state_dict().items()
        if not any(key.startswith(f"{prefix}.") for prefix in replaced)
    }
    for prefix, module in replaced.items():
        linear = module.linear if isinstance(module, SparseConv1x1) else module
        state[f"{prefix}.weight"] = module.dense_weight()
        if linear.bias is not None:
            state[f"{prefix}.bias"] = linear.bias.detach()
    return state


def save_accelerated(model: nn.Module, path: str | os.PathLike) -> None:
    """Write an accelerated model: its masked weights as a sparse checkpoint, with each
    layer's kernel (and the times measured) in the metadata."""
    found = choices(model)
    if not found:
        raise ValueError("the model is not accelerated (no choices): use winnow.accelerate first")
    originals = getattr(model, "winnow_transposed", set())
    state = _dense_state(model)
    for name in originals:
        state[f"{name}.weight"] = state[f"{name}.weight"].t().contiguous()
    metadata = {"accelerate": {k: asdict(v) for k, v in found.items()}}
    save_sparse(state, path, metadata=metadata)


def load_accelerated(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """``model`` (an instance of the saved architecture) with the saved weights and each
    layer's saved kernel, without timing again."""
    state = load_sparse(path)
    meta = sparse_metadata(path).get("accelerate")
    if meta is None:
        raise ValueError(f"{path} holds no accelerated model (no kernel choices)")
    fast = copy.deepcopy(model).eval()
    fast.load_state_dict(state, strict=True)
    layers = _layers(fast)
    saved, transposed = {}, set()
    for name, raw in meta.items():
        choice = LayerChoice(
            **{**raw, "shape": tuple(raw["shape"]), "pattern": tuple(raw["pattern"])}
        )
        saved[name] = choice
        if choice.kernel == "dense":
            continue
        if name not in layers:
            raise ValueError(f"{path}: layer {name!r} of the saved choices is not in the model")
        module, weight, bias = layers[name]
        layer = SparseLinear.from_weight(weight, bias, choice.kernel, choice.pattern)
        if _conv1d_class(module):
            transposed.add(name)
        replace_submodule(fast, name, _wrap(module, layer))
    fast.winnow_choices = saved
    fast.winnow_transposed = transposed
    return fast
