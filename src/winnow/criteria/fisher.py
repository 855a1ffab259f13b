"""Second-order criteria from the empirical Fisher: OBD, and OBS / WoodFisher with its update.

Notation: θ the weights, ∇ℓⱼ the gradient of sample j's loss, the empirical
Fisher F = (1/N) Σⱼ ∇ℓⱼ ∇ℓⱼᵀ, an estimate of the Hessian of the loss at a minimum.

- OBD (LeCun, Denker & Solla 1990, "Optimal Brain Damage"): with a diagonal Hessian, removing
  θᵢ raises the loss by ρᵢ = θᵢ² Hᵢᵢ / 2; here Hᵢᵢ ≈ Fᵢᵢ = (1/N) Σⱼ (∂ℓⱼ/∂θᵢ)².
- OBS (Hassibi & Stork 1992, "Optimal Brain Surgeon"): with the full Hessian, removing θᵢ and
  letting the other weights move optimally raises the loss by ρᵢ = θᵢ² / (2 [H⁻¹]ᵢᵢ), with the
  update δθ = −θᵢ H⁻¹eᵢ / [H⁻¹]ᵢᵢ; for a set Q removed together, δθ = −H⁻¹[:, Q]
  ([H⁻¹]_QQ)⁻¹ θ_Q.
- WoodFisher (Singh & Alistarh 2020): OBS with H ≈ F + λI, inverted block-diagonally (blocks of
  ``block_size`` consecutive weights of a tensor) by Sherman-Morrison updates from
  F₀⁻¹ = λ⁻¹ I: F⁻¹ ← F⁻¹ − (F⁻¹∇ℓⱼ)(F⁻¹∇ℓⱼ)ᵀ / (N + ∇ℓⱼᵀF⁻¹∇ℓⱼ), applied a chunk of
  samples at a time in their Woodbury form (the same result, one pass per chunk).

Per-sample gradients come from one backward pass per sample, with the model in eval mode
(BatchNorm uses its running statistics).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from winnow.core.prunable import prunable_parameters
from winnow.criteria.losses import batch_loss
from winnow.criteria.options import Checked
from winnow.criteria.registry import register
from winnow.criteria.sampling import model_device
from winnow.inputs import LossFunction, index, sample, size


def sample_gradients(
    model: nn.Module, params: dict[str, Tensor], batch, loss_fn: LossFunction | None = None
) -> Iterator[tuple[Tensor, ...]]:
    """∇ℓⱼ for each example j of ``batch`` in turn: the gradients of ``params`` (in their
    order) of example j's loss alone (``loss_fn(model, example)``, by default its
    cross-entropy). One backward pass per example: on the CPU this is many times faster than
    ``torch.func.vmap`` over convolutions. The model should be in eval mode (BatchNorm on
    running statistics)."""
    tensors = list(params.values())
    for j in range(size(batch)):
        loss = batch_loss(model, index(batch, slice(j, j + 1)), loss_fn=loss_fn)
        yield torch.autograd.grad(loss, tensors)


def per_sample_gradients(
    model: nn.Module, params: dict[str, Tensor], batch, loss_fn: LossFunction | None = None
) -> dict[str, Tensor]:
    """∇ℓⱼ for every example j of ``batch`` (``(x, y)`` or any batch of
    :mod:`winnow.inputs`): name -> tensor (examples, *shape); see :func:`sample_gradients`."""
    out = {
        n: torch.empty((size(batch), *p.shape), dtype=p.dtype, device=p.device)
        for n, p in params.items()
    }
    for j, grads in enumerate(sample_gradients(model, params, batch, loss_fn)):
        for name, g in zip(params, grads, strict=True):
            out[name][j] = g
    return out


def _gradient_chunks(
    model: nn.Module, names: list[str], batches: list, loss_fn: LossFunction | None = None
) -> Iterator[dict[str, Tensor]]:
    """Per-sample gradients of the prunable tensors ``names``, one chunk per batch, in eval
    mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        params = prunable_parameters(model, names)
        for batch in batches:
            yield per_sample_gradients(model, params, batch, loss_fn)
    finally:
        model.train(was_training)


def _batches(model: nn.Module, data, samples: int, chunk: int, seed: int):
    batches = sample(data, samples, chunk, seed=seed, device=model_device(model))
    return batches, sum(size(b) for b in batches)


@dataclass(frozen=True)
class ObdOptions(Checked):
    """``samples`` training examples drawn with ``seed``, moved to the device ``chunk`` at a
    time (one backward pass per sample either way)."""

    samples: int = 1000
    chunk: int = 100
    seed: int = 0
    loss_fn: LossFunction | None = None


@register("obd", ObdOptions, needs_data=True)
def obd(
    work: nn.Module, params: dict[str, nn.Parameter], data, options: ObdOptions, state=None
) -> dict[str, Tensor]:
    """OBD (LeCun et al. 1990): θ² · diag(F) / 2 with the diagonal empirical Fisher
    Fᵢᵢ = (1/N) Σⱼ (∂ℓⱼ/∂θᵢ)² over ``samples`` training examples (one backward pass per
    sample, in eval mode; ``chunk`` only sets how many are moved to the device at once)."""
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    batches, count = _batches(work, data, options.samples, options.chunk, options.seed)
    work.eval()
    for batch in batches:
        for grads in sample_gradients(work, params, batch, options.loss_fn):
            for n, g in zip(params, grads, strict=True):
                fisher[n].addcmul_(g, g)
    return {n: p.detach().pow(2) * fisher[n] / (2 * count) for n, p in params.items()}


def woodfisher_memory(numels: list[int], block_size: int, dtype: torch.dtype) -> int:
    """Bytes of the block-diagonal inverse: Σ_tensors ⌈n / B⌉ · B² elements."""
    blocks = sum(math.ceil(n / block_size) for n in numels)
    return blocks * block_size * block_size * torch.empty((), dtype=dtype).element_size()


def woodbury_update(
    inverse: Tensor | None, chunk: Tensor, block_size: int, damp: float, count: int
) -> Tensor:
    """One update of the block-diagonal (F + λI)⁻¹ with a chunk (k, P) of per-sample gradients.

    ``inverse`` is (P / B, B, B), or None to start from F₀⁻¹ = λ⁻¹ I; ``count`` = N, the
    number of samples in all chunks together (F = (1/N) Σⱼ gⱼgⱼᵀ). The update
    F⁻¹ ← F⁻¹ − U (N·I + GᵀU)⁻¹ Uᵀ with U = F⁻¹G (Woodbury) equals k successive
    Sherman-Morrison updates F⁻¹ ← F⁻¹ − (F⁻¹g)(F⁻¹g)ᵀ / (N + gᵀF⁻¹g) (a chunk of one sample is
    exactly one), with one pass over the inverse per chunk instead of per sample.
    """
    k = len(chunk)
    g = chunk.reshape(k, -1, block_size).permute(1, 2, 0)  # (blocks, B, k)
    if inverse is None:
        eye = torch.eye(block_size, dtype=chunk.dtype, device=chunk.device) / damp
        inverse = eye.repeat(g.shape[0], 1, 1)
    g = g.to(inverse.dtype)
    u = torch.bmm(inverse, g)  # (blocks, B, k)
    inner = torch.bmm(g.transpose(1, 2), u)
    inner.diagonal(dim1=1, dim2=2).add_(count)
    inverse.baddbmm_(u, torch.linalg.solve(inner, u.transpose(1, 2)), alpha=-1.0)
    return inverse


class _BlockInverse:
    """(F + λI)⁻¹ block-diagonally, F = (1/N) Σⱼ gⱼgⱼᵀ, fed chunk by chunk (see
    :func:`fisher_inverse_blocks`)."""

    def __init__(self, block_size: int, damp: float, count: int, dtype: torch.dtype):
        self.block_size, self.damp, self.count, self.dtype = block_size, damp, count, dtype
        self.inverse: Tensor | None = None
        self.fisher: Tensor | None = None

    def add(self, chunk: Tensor) -> None:
        chunk = chunk.to(self.dtype)
        if self.inverse is None and (self.fisher is not None or len(chunk) >= self.block_size):
            g = chunk.reshape(len(chunk), -1, self.block_size).permute(1, 2, 0)
            product = torch.bmm(g, g.transpose(1, 2))
            self.fisher = product if self.fisher is None else self.fisher.add_(product)
        else:
            self.inverse = woodbury_update(
                self.inverse, chunk, self.block_size, self.damp, self.count
            )

    def result(self) -> Tensor:
        if self.fisher is not None:
            self.fisher.div_(self.count).diagonal(dim1=1, dim2=2).add_(self.damp)
            return torch.linalg.inv(self.fisher)
        if self.inverse is None:
            raise ValueError("no gradient to build the Fisher inverse from")
        return self.inverse


def fisher_inverse_blocks(
    gradients: Iterable[Tensor], block_size: int, damp: float, count: int, dtype=torch.float64
) -> Tensor:
    """(F + λI)⁻¹ block-diagonally, F = (1/N) Σⱼ gⱼgⱼᵀ, built chunk by chunk.

    ``gradients`` yields chunks (k, P) of per-sample gradients of one tensor, flattened and
    zero-padded to whole blocks of ``block_size`` = B; ``count`` = N, the number of samples in
    all chunks. Chunks smaller than B update the inverse from F₀⁻¹ = λ⁻¹ I by
    :func:`woodbury_update` (Sherman-Morrison for k = 1); chunks of B samples or more, where
    the k x k systems of that update cost more than the blocks themselves, accumulate F
    instead and invert it once at the end. Both give the same inverse (tested against
    ``torch.linalg.inv``). Returns (P / B, B, B): block b is the inverse over the weights
    b·B .. (b + 1)·B − 1.
    """
    accumulator = _BlockInverse(block_size, damp, count, dtype)
    for chunk in gradients:
        accumulator.add(chunk)
    return accumulator.result()


def padded(t: Tensor, block_size: int) -> Tensor:
    """(n, *shape) -> (n, P) flattened and zero-padded to a multiple of ``block_size``."""
    flat = t.reshape(t.shape[0], -1)
    return nn.functional.pad(flat, (0, (-flat.shape[1]) % block_size))


@dataclass(frozen=True)
class WoodFisherOptions(Checked):
    """``samples`` training examples drawn with ``seed`` (``chunk`` per-sample gradients at a
    time); the inverse is block-diagonal with blocks of ``block_size`` weights, damped by
    ``damp`` (λ in F + λI)."""

    samples: int = 1000
    block_size: int = 128
    damp: float = 1e-5
    chunk: int = 100
    seed: int = 0
    loss_fn: LossFunction | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0:
            raise ValueError(f"WoodFisherOptions.damp must be > 0, got {self.damp!r}")


def woodfisher_inverses(
    model: nn.Module,
    data,
    names: list[str] | None = None,
    options: WoodFisherOptions | None = None,
    dtype: torch.dtype = torch.float64,
    max_memory: int = 4 << 30,
) -> dict[str, Tensor]:
    """Block-diagonal inverses of the damped empirical Fisher, one (blocks, B, B) per tensor.

    Raises ``ValueError`` before allocating anything if the inverse would take more than
    ``max_memory`` bytes (see :func:`woodfisher_memory`: blocks × B² × dtype size).
    """
    options = options or WoodFisherOptions()
    params = prunable_parameters(model, names)
    samples, block_size, damp = options.samples, options.block_size, options.damp
    chunk, seed = options.chunk, options.seed
    need = woodfisher_memory([p.numel() for p in params.values()], block_size, dtype)
    if need > max_memory:
        raise ValueError(
            f"the block-diagonal Fisher inverse needs {need / 2**20:.0f} MiB (block size "
            f"{block_size}); above max_memory={max_memory / 2**20:.0f} MiB: use smaller blocks"
        )
    total = sum(p.numel() for p in params.values())
    chunk = max(1, min(chunk, (1 << 27) // total))  # per-sample gradients: at most 512 MiB
    batches, count = _batches(model, data, samples, chunk, seed)
    inverses = {name: _BlockInverse(block_size, damp, count, dtype) for name in params}
    for grads in _gradient_chunks(model, list(params), batches, options.loss_fn):
        for name, accumulator in inverses.items():
            accumulator.add(padded(grads[name], block_size))
    return {name: accumulator.result() for name, accumulator in inverses.items()}


def _diagonal(inverse: Tensor, shape: torch.Size) -> Tensor:
    numel = math.prod(shape)
    return inverse.diagonal(dim1=1, dim2=2).reshape(-1)[:numel].reshape(shape)


@dataclass
class WoodFisherState:
    """What WoodFisher leaves for an update rule: the block-diagonal inverses it scored with
    (one (blocks, B, B) tensor per parameter), from its last call."""

    inverses: dict[str, Tensor] | None = None


@register("woodfisher", WoodFisherOptions, needs_data=True, state=WoodFisherState)
def woodfisher(
    work: nn.Module,
    params: dict[str, nn.Parameter],
    data,
    options: WoodFisherOptions,
    state: WoodFisherState | None = None,
) -> dict[str, Tensor]:
    """OBS / WoodFisher scores ρᵢ = θᵢ² / (2 [F⁻¹]ᵢᵢ) with the block-diagonal inverse of the
    damped empirical Fisher (Singh & Alistarh 2020). Scores only: with the update rule of
    :func:`winnow.schedules.obs_prune` the remaining weights also move optimally."""
    inverses = woodfisher_inverses(work, data, list(params), options)
    if state is not None:
        state.inverses = inverses
    return obs_scores(params, inverses)


def obs_scores(params: dict[str, Tensor], inverses: dict[str, Tensor]) -> dict[str, Tensor]:
    """ρᵢ = θᵢ² / (2 [F⁻¹]ᵢᵢ) per tensor, from the block-diagonal inverses of
    :func:`woodfisher_inverses`."""
    return {
        n: p.detach().pow(2) / (2 * _diagonal(inverses[n], p.shape).to(p.dtype))
        for n, p in params.items()
    }


def obs_update(theta: Tensor, inverse: Tensor, removed: Tensor) -> Tensor:
    """θ + δθ: remove the weights ``removed`` (indices) of ``theta`` together, optimally.

    δθ = −H⁻¹[:, Q] ([H⁻¹]_QQ)⁻¹ θ_Q (Hassibi & Stork 1992, for a set Q of weights), which
    minimises the quadratic model of the loss subject to θ_Q = 0; the result has exactly 0.0
    at Q. ``inverse`` is H⁻¹ (P, P) for the P weights of ``theta`` (a 1-D tensor).
    """
    if removed.numel() == 0:
        return theta.clone()
    h_q = inverse[:, removed]
    step = torch.linalg.solve(h_q[removed], theta[removed])
    new = theta - h_q @ step
    new[removed] = 0.0
    return new
