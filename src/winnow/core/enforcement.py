"""Keeping pruned weights at exactly zero while a model trains.

Design: instead of multiplying each weight by its mask in every
forward pass (the forward-hook design of ``torch.nn.utils.prune``), pruned entries are

1. zeroed once, together with the optimizer's per-parameter state (momentum, Adam moments);
2. masked in the gradient right after it is accumulated (a post-accumulate-grad hook, while
   the gradient is still in cache), and checked again at the optimizer's pre-step hook: a
   gradient that was replaced (``p.grad = ...``) or changed in place after its masking
   (differential-privacy noise, clipping, a gradient scaler's unscaling: any in-place
   operation bumps the tensor's version counter) is masked again there, so the update sees
   exactly zero on pruned entries whatever the loop did between backward and step, and no
   optimizer state can build up there. An untouched gradient costs the check only (a look at
   its identity and version);
3. for optimizers whose update rule is not known to map (weight 0, gradient 0, state 0) to 0,
   zeroed again after every step (an optimizer step hook).

For the optimizers of ``torch.optim`` listed in :data:`ZERO_PRESERVING` (SGD with momentum and
weight decay, Adam, AdamW, ...), step 3 is skipped: with a zero weight, a zero gradient and zero
state, every term of their update is exactly 0.0 in IEEE arithmetic (0 * x = 0, 0 / (v + eps) =
0), so the pruned weights stay exactly zero without it. This matters for speed: the
re-zeroing is a full pass over the weights after every step. The tests check both paths.

The forward pass is untouched, the model's ``state_dict`` keeps its standard keys (a trained
sparse model loads into a fresh instance of its class), and ``copy.deepcopy`` works.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from winnow.core.masks import Masks

ZERO_PRESERVING: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
)
"""Optimizer classes whose step leaves a weight at exactly 0.0 when its gradient and state are
0.0 (exact classes: a subclass may change the rule, so it gets the re-zeroing hook)."""


class _MaskGradient:
    """Post-accumulate-grad hook: ``param.grad *= mask`` (a small object, so deepcopy works).

    ``masked`` is the identity and version of the gradient tensor it last masked: a gradient
    with the same identity and version has not changed since (every in-place operation bumps
    the version; a replaced ``.grad`` is another tensor)."""

    def __init__(self, keep: Tensor):
        self.keep = keep
        self.masked: tuple[int, int] | None = None
        self.capture = False  # keep the next gradient dense until it is masked, and copy it
        self.dense: Tensor | None = None

    def __call__(self, param: Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        if self.capture:  # accumulate densely; masked (and copied) before the step
            self.masked = None
            return
        grad.mul_(self.keep)
        self.masked = (id(grad), grad._version)

    def mask(self, grad: Tensor | None) -> None:
        if grad is not None and self.masked != (id(grad), grad._version):
            if self.capture:
                self.dense, self.capture = grad.detach().clone(), False
            grad.mul_(self.keep)
            self.masked = (id(grad), grad._version)


class MaskEnforcer:
    """Keeps the pruned weights of ``model`` at exactly zero during training.

    Use :func:`enforce` to create one. With an optimizer attached, nothing else is needed.
    Without one (a custom update rule), call :meth:`zero_pruned` after each update.
    :meth:`remove` (or leaving a ``with`` block) detaches every hook; the weights stay as they
    are.
    """

    def __init__(self, model: nn.Module, masks: Masks):
        params = masks.check_model(model)
        self.masks = masks
        self._names = list(params)
        self._optimizers: list[torch.optim.Optimizer] = []
        self._params: list[Tensor] = []
        self._keep: list[Tensor] = []
        self._handles: list = []
        self._maskers: list[_MaskGradient] = []
        for name, param in params.items():
            keep = masks[name].to(device=param.device, dtype=param.dtype)
            self._params.append(param)
            self._keep.append(keep)
            masker = _MaskGradient(keep)
            self._maskers.append(masker)
            self._handles.append(param.register_post_accumulate_grad_hook(masker))
        self.zero_pruned()
        self.mask_gradients()

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights now, those changed since their last masking."""
        for param, masker in zip(self._params, self._maskers, strict=True):
            masker.mask(param.grad)

    def capture_dense_gradients(self) -> None:
        """Keep the gradients of the next optimizer step dense until they are masked (at the
        step, or by :meth:`mask_gradients`), and keep a copy of each dense gradient then, for
        :meth:`dense_gradients`. Growth by gradient (RigL) asks for it at its update steps
        only; the other steps cost what they did."""
        for masker in self._maskers:
            masker.capture, masker.dense, masker.masked = True, None, None

    @torch.no_grad()
    def dense_gradients(self) -> dict[str, Tensor]:
        """The dense gradients captured since :meth:`capture_dense_gradients` (name -> tensor;
        a gradient still waiting, as after a step a gradient scaler skipped, is copied and
        masked now); the copies are handed over and forgotten."""
        gradients: dict[str, Tensor] = {}
        for name, param, masker in zip(self._names, self._params, self._maskers, strict=True):
            if masker.capture:
                masker.mask(param.grad)
                masker.capture = False
            if masker.dense is not None:
                gradients[name] = masker.dense
            masker.dense = None
        return gradients

    @torch.no_grad()
    def zero_pruned(self) -> None:
        """Set every pruned weight to exactly 0.0 (one fused multiply per tensor)."""
        torch._foreach_mul_(self._params, self._keep)

    @torch.no_grad()
    def attach(self, optimizer: torch.optim.Optimizer, rezero: bool | None = None) -> MaskEnforcer:
        """Keep pruned weights at zero through the steps of ``optimizer``; clear their state now.

        Per-parameter optimizer state with the parameter's shape (momentum buffers, Adam's
        moments) is zeroed on pruned entries, so nothing accumulated before pruning can move
        them again. ``rezero``: whether to re-zero the pruned weights after every step; by
        default only for optimizers not in :data:`ZERO_PRESERVING`.
        """
        self._optimizers.append(optimizer)
        self._clear_state(optimizer)
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        if rezero is None:
            rezero = type(optimizer) not in ZERO_PRESERVING
        if rezero:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        return self

    @torch.no_grad()
    def update(self, masks: Masks) -> MaskEnforcer:
        """Enforce new masks from now on (gradual pruning, dense-sparse-dense phases).

        Newly pruned weights are zeroed with their optimizer state; weights that ``masks``
        restores (a dense phase) start again from 0.0 with zero state, as in Han et al. 2017.
        ``masks`` must cover the same tensors as before.
        """
        if set(masks) != set(self._names):
            raise ValueError("the new masks cover different tensors than the enforced ones")
        for name, keep, masker in zip(self._names, self._keep, self._maskers, strict=True):
            keep.copy_(masks[name].to(device=keep.device, dtype=keep.dtype))
            masker.masked = None  # a gradient masked by the old masks needs the new ones
        self.masks = masks
        self.zero_pruned()
        for optimizer in self._optimizers:
            self._clear_state(optimizer)
        return self

    @torch.no_grad()
    def _clear_state(self, optimizer: torch.optim.Optimizer) -> None:
        by_id = {id(p): keep for p, keep in zip(self._params, self._keep, strict=True)}
        for group in optimizer.param_groups:
            for param in group["params"]:
                keep = by_id.get(id(param))
                if keep is None:
                    continue
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, Tensor) and value.shape == param.shape:
                        value.mul_(keep.to(value.dtype))

    def _before_step(self, optimizer, args, kwargs) -> None:
        for param, masker in zip(self._params, self._maskers, strict=False):
            grad = param.grad  # unchanged since its masking: the check only
            if grad is not None and masker.masked != (id(grad), grad._version):
                masker.mask(grad)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.zero_pruned()

    def remove(self) -> None:
        """Detach every hook this enforcer registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> MaskEnforcer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def enforce(
    model: nn.Module,
    masks: Masks,
    optimizer: torch.optim.Optimizer | None = None,
    rezero: bool | None = None,
) -> MaskEnforcer:
    """Zero the pruned weights of ``model`` and keep them at exactly 0.0 while it trains.

    ``masks`` holds ``True`` for kept weights. Returns a :class:`MaskEnforcer`; pass the
    ``optimizer`` (or call ``enforcer.attach(optimizer)`` later) so its state is cleared on
    pruned entries and, for rules not known to preserve zeros (``rezero=None``, the default;
    ``True`` forces it), pruned weights are re-zeroed after every step. Pruned weights stay
    exactly 0.0 for SGD with momentum and weight decay, Adam, AdamW or any other rule.

    Example::

        enforcer = winnow.enforce(model, masks, optimizer)
        for x, y in batches:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()   # .grad is dense here (clip, add noise: any)
            optimizer.step()                  # masked at the step: pruned weights stay 0.0
    """
    enforcer = MaskEnforcer(model, masks)
    if optimizer is not None:
        enforcer.attach(optimizer, rezero=rezero)
    return enforcer
