"""Layer-wise one-shot pruning with calibration data, block by block (SparseGPT's sequential
mode).

:func:`oneshot` runs the calibration batches through the model up to its first block and keeps
that block's inputs (positional and keyword arguments: hidden states, attention masks, position
embeddings). Then, for each block in turn: hooks on the block's weight matrices accumulate each
layer's input Gram matrix S = Σ xxᵀ while the block runs on the kept inputs; each layer is pruned
by its solver (:mod:`winnow.layerwise.solvers`); the *pruned* block runs again on the same inputs,
and its outputs become the next block's inputs. Only one block's activations are held at a
time. With ``sequential=False`` every block sees the dense model's activations instead.

Embeddings, norms, biases and the layers outside the blocks (the output head) stay dense, and
so do weights a block uses without calling their module (``nn.MultiheadAttention``'s
``in_proj_weight`` and ``out_proj``: a warning names them).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from winnow.core.masks import Masks
from winnow.core.nm import Pattern, parse_pattern
from winnow.devices import resolve_device
from winnow.inputs import DataSource, inputs, iterate, move
from winnow.layerwise.blocks import block_layers, find_blocks
from winnow.layerwise.solvers import SOLVERS, reconstruction_error, solve


@dataclass
class LayerReport:
    """One pruned layer: its weight's name, shape, kept fraction, the calibration tokens, the
    reconstruction error ‖WX − ŴX‖² relative to ‖WX‖², and the solver's seconds."""

    name: str
    shape: tuple[int, ...]
    density: float
    tokens: int
    relative_error: float
    seconds: float


@dataclass
class OneShotResult:
    """The pruned model, its masks (with the N:M pattern recorded, if any), a report per layer
    and the whole run's seconds."""

    model: nn.Module
    masks: Masks
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        rows = [f"{'layer':<48} {'shape':>12} {'density':>8} {'rel. error':>10} {'s':>7}"]
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            rows.append(
                f"{r.name:<48} {shape:>12} {r.density:>8.2%} {r.relative_error:>10.4f} "
                f"{r.seconds:>7.3f}"
            )
        return "\n".join(rows)


class _Stop(Exception):
    """Raised by the first block's pre-hook: the inputs are captured, the rest is not needed."""


def _batches(calibration: DataSource | Tensor, batch_size: int) -> list[Any]:
    if isinstance(calibration, Tensor):  # token ids (N, L), or inputs without labels
        if len(calibration) == 0:
            raise ValueError("the calibration data is empty")
        return [(calibration[i : i + batch_size],) for i in range(0, len(calibration), batch_size)]
    found = list(iterate(calibration, batch_size))
    if not found:
        raise ValueError("the calibration data is empty")
    return found


def _call_inputs(model: nn.Module, batch: Any) -> None:
    x = inputs(batch)
    model(**x) if isinstance(x, Mapping) else model(x)


def _capture(model: nn.Module, first: nn.Module, batches: list[Any], device) -> list[tuple]:
    """The (args, kwargs) the first block is called with, one per calibration batch."""
    captured: list[tuple] = []

    def hook(module, args, kwargs):
        captured.append((args, dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    _call_inputs(model, move(batch, device))
                except _Stop:
                    continue
                raise ValueError(
                    "the model finished a forward pass without calling its first block"
                )
    finally:
        handle.remove()
    return captured


def _hidden(output: Any) -> Tensor:
    """A block's hidden states: its output, or the first element of a tuple output."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(f"cannot find the hidden states in a block's {type(output).__name__} output")


def _with_hidden(call: tuple, hidden: Tensor) -> tuple:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return (), {**kwargs, key: hidden}


class _Gram:
    """Forward hook that adds the layer's inputs to S = Σ xxᵀ (float64) and counts them."""

    def __init__(self, size: int, device) -> None:
        self.gram = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.tokens = 0

    def __call__(self, module, args, output) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
        self.gram.addmm_(x.T, x)
        self.tokens += x.shape[0]


def _matrix(layer: nn.Module) -> Tensor:
    """The layer's weight as (out, in): a Conv1D's is stored transposed."""
    weight = layer.weight.detach()
    return weight.T if type(layer).__name__ == "Conv1D" else weight


def oneshot(
    model: nn.Module,
    method: str,
    calibration: DataSource | Tensor,
    *,
    density: float | None = None,
    pattern: str | Pattern | None = None,
    blocks: str | None = None,
    exclude: Sequence[str] = (),
    sequential: bool = True,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    inplace: bool = False,
    **options: Any,
) -> OneShotResult:
    """Prune ``model``'s blocks one layer at a time with ``method`` and calibration data.

    Args:
        method: ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"`` (per output row).
        calibration: batches the model is called with (token ids ``(N, L)``, a list or a
            DataLoader of dict or tuple batches; labels are not needed).
        density: the fraction of each layer's weights kept (0.5 = 50% sparsity); or
        pattern: an N:M pattern such as ``"2:4"`` along each layer's input dimension.
        blocks: the path of the stack of blocks (default: found, see
            :func:`winnow.layerwise.find_blocks`).
        exclude: regular expressions of layer names inside a block to leave dense.
        sequential: feed the pruned blocks' outputs forward (SparseGPT's sequential mode);
            False feeds the dense activations.
        device: where the blocks compute (default: where the model is).
        inplace: prune ``model`` itself (default: a copy; ``model`` is not changed).
        options: the solver's options (SparseGPT: ``damping``, ``block_size``).

    Returns:
        :class:`OneShotResult`: the pruned model (in eval mode), its masks by full parameter
        name, a report per layer.
    """
    started = time.perf_counter()
    if method not in SOLVERS:
        raise ValueError(f"unknown one-shot method {method!r}; choose one of {sorted(SOLVERS)}")
    if (density is None) == (pattern is None):
        raise ValueError("give exactly one of density=... (unstructured) and pattern='N:M'")
    chosen = parse_pattern(pattern) if pattern is not None else None
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    first_param = next(work.parameters())
    device = resolve_device(device) if device is not None else first_param.device
    config = getattr(work, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused encoder layer hides its Linears
    try:
        path, stack = find_blocks(work, blocks)
        names = {module: name for name, module in work.named_modules()}
        batches = _batches(calibration, batch_size)
        calls = _capture(work, stack[0], batches, first_param.device)
        calls = [move(c, device) for c in calls]
        report: list[LayerReport] = []
        masks: dict[str, Tensor] = {}
        patterns: dict[str, tuple[int, int, int]] = {}
        dense_calls = calls if not sequential else []
        for block in stack:
            home = next(block.parameters()).device
            block.to(device)
            layers = block_layers(block, exclude)
            if not layers:
                block.to(home)
                continue
            grams = {n: _Gram(_matrix(m).shape[1], device) for n, m in layers.items()}
            handles = [m.register_forward_hook(grams[n]) for n, m in layers.items()]
            try:
                with torch.no_grad():
                    if sequential:
                        for args, kwargs in calls:
                            block(*args, **kwargs)
                    else:  # the dense block's outputs are the next block's inputs
                        dense_out = [_hidden(block(*a, **k)) for a, k in dense_calls]
            finally:
                for handle in handles:
                    handle.remove()
            for name, layer in layers.items():
                full = f"{names[layer]}.weight"
                stats = grams[name]
                if stats.tokens == 0:  # its forward is bypassed (MultiheadAttention.out_proj)
                    warnings.warn(
                        f"{full} never received an input through its forward (its parent calls "
                        "its weight directly); left dense",
                        stacklevel=2,
                    )
                    continue
                began = time.perf_counter()
                matrix = _matrix(layer)
                gram = stats.gram.to(
                    torch.float32 if matrix.dtype != torch.float64 else torch.float64
                )
                new, keep = solve(method, matrix, gram, stats.tokens, density=density,
                                  pattern=chosen, **options)  # fmt: skip
                seconds = time.perf_counter() - began
                base = float(((matrix.to(gram.dtype) @ gram) * matrix.to(gram.dtype)).sum())
                error = reconstruction_error(matrix, new, gram)
                conv1d = type(layer).__name__ == "Conv1D"
                with torch.no_grad():
                    layer.weight.copy_(new.T if conv1d else new)
                keep_stored = keep.T.contiguous() if conv1d else keep
                masks[full] = keep_stored.cpu()
                if chosen is not None:
                    patterns[full] = (chosen.n, chosen.m, 0 if conv1d else 1)
                report.append(
                    LayerReport(full, tuple(layer.weight.shape), float(keep.float().mean()),
                                stats.tokens, error / base if base > 0 else 0.0, seconds)
                )  # fmt: skip
            with torch.no_grad():
                if sequential:
                    calls = [_with_hidden(c, _hidden(block(*c[0], **c[1]))) for c in calls]
                else:
                    dense_calls = [
                        _with_hidden(c, h) for c, h in zip(dense_calls, dense_out, strict=True)
                    ]
            block.to(home)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        if use_cache:
            config.use_cache = use_cache
    if not masks:
        raise ValueError(f"the blocks at {path!r} hold no Linear layer to prune")
    return OneShotResult(work, Masks(masks, patterns), report, time.perf_counter() - started)
