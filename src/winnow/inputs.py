"""What winnow accepts as data, and the loss it computes on it (stage 2).

Every function of winnow that reads data (the criteria, :func:`winnow.train`,
:func:`winnow.evaluate`, iterative magnitude pruning, Pruning from Scratch) takes any of

- a :class:`~winnow.data.DataSplits` (its training split, or the split asked for);
- a pair ``(x, y)`` of tensors with the same first dimension;
- an iterable of batches: a ``torch.utils.data.DataLoader``, a list or tuple of batches. A
  batch is a pair ``(x, y)`` (or a longer tuple: inputs first, labels second), or a dict as
  Hugging Face collators return (``input_ids``, ``attention_mask``, ``labels``, ...), passed
  to the model as keyword arguments.

Inputs keep their dtype: integer token ids go to embedding layers as they are.

:func:`default_loss` understands what models return: logits, an object with ``.logits`` or
``.loss`` (Hugging Face outputs), or a tuple whose first element is the logits; logits of shape
``(..., classes)`` with labels of shape ``(...)`` (a language model's tokens) are flattened.
Any function ``loss_fn(model, batch) -> scalar`` can replace it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from winnow.core.prunable import unwrap
from winnow.data import DataSplits

Batch = Any
"""A pair ``(x, y)``, a longer tuple (inputs first, labels second), or a dict of tensors."""
DataSource = DataSplits | tuple[Tensor, Tensor] | Iterable[Batch]
LossFunction = Callable[[nn.Module, Batch], Tensor]

LABEL_KEYS = ("labels", "label", "targets", "target", "y")
"""Keys a dict batch may hold its labels under."""


class DataError(ValueError):
    """Data winnow cannot use: empty, of an unknown form, or without what a method needs."""


def is_pair(data: Any) -> bool:
    """Whether ``data`` is ``(x, y)``: two tensors with the same first dimension."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and data[0].dim() > 0
        and data[1].dim() > 0
        and len(data[0]) == len(data[1])
    )


def split(data: DataSource, which: str = "train") -> DataSource:
    """The ``which`` split of a :class:`DataSplits` as a pair; any other data as it is."""
    if isinstance(data, DataSplits):
        return getattr(data, f"x_{which}"), getattr(data, f"y_{which}")
    return data


def iterate(data: DataSource, batch_size: int | None = None) -> Iterator[Batch]:
    """The batches of ``data`` in order (a DataSplits' training split; a pair in slices of
    ``batch_size``, whole without one; an iterable as it yields them)."""
    data = split(data)
    if is_pair(data):
        x, y = data
        size = batch_size or len(x)
        for start in range(0, len(x), size):
            yield x[start : start + size], y[start : start + size]
        return
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise DataError(
            f"cannot read batches from a {type(data).__name__}: pass a DataSplits, a pair "
            "(x, y) of tensors, or an iterable of batches (a DataLoader, a list of (x, y) or "
            "of dicts)"
        )
    yield from data


def first_batch(data: DataSource) -> Batch:
    """The first batch of ``data``; :class:`DataError` if there is none."""
    for batch in iterate(data, batch_size=1):
        return batch
    raise DataError("the data holds no batch (it is empty)")


def inputs(batch: Batch) -> Any:
    """What the model is called with: ``x`` of a tuple batch, the dict without its labels."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Tensor):
        return batch
    raise DataError(f"a batch is a tuple (x, y) or a dict, not a {type(batch).__name__}")


def labels(batch: Batch) -> Tensor | None:
    """The labels of a batch (``y`` of a tuple, a dict's ``labels``), or None."""
    if isinstance(batch, Mapping):
        return next((batch[k] for k in LABEL_KEYS if k in batch), None)
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], Tensor):
        return batch[1]
    return None


def size(batch: Batch) -> int:
    """How many examples a batch holds (the first dimension of its labels or inputs)."""
    y = labels(batch)
    if y is not None:
        return len(y)
    x = inputs(batch)
    first = next(iter(x.values())) if isinstance(x, Mapping) else x
    if not isinstance(first, Tensor):
        raise DataError("a batch holds no tensor to count its examples by")
    return len(first)


def move(batch: Batch, device: torch.device | str) -> Batch:
    """A batch with every tensor on ``device`` (``non_blocking``: pinned memory overlaps)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move(v, device) for v in batch)
    return batch


def index(batch: Batch, at: Tensor | slice) -> Batch:
    """The examples ``at`` of a batch (every tensor sliced along its first dimension)."""
    if isinstance(batch, Tensor):
        return batch[at] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return {k: index(v, at) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(index(v, at) for v in batch)
    return batch


def concat(batches: Sequence[Batch]) -> Batch:
    """Batches of the same form joined along the first dimension."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(list(batches))
    if isinstance(first, Mapping):
        return {k: concat([b[k] for b in batches]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat([b[i] for b in batches]) for i in range(len(first)))
    return first


def call(model: nn.Module, batch: Batch) -> Any:
    """``model`` applied to a batch's inputs. A dict batch is passed as keyword arguments,
    its labels included when the model's ``forward`` names that argument (Hugging Face models
    take ``labels`` and return their own loss: a causal language model shifts its labels)."""
    x = inputs(batch)
    if not isinstance(x, Mapping):
        return model(x)
    if not isinstance(batch, Mapping):  # a tuple whose inputs are a dict: no labels passed
        return model(**x)
    named = _arguments(model)
    extra = {k: v for k, v in batch.items() if k in LABEL_KEYS and k in named}
    return model(**x, **extra)


def _arguments(model: nn.Module) -> frozenset[str]:
    """The names of the explicit arguments of ``model.forward`` (of the model a wrapper such as
    ``torch.compile`` or DDP holds; empty if unknown)."""
    try:
        return frozenset(inspect.signature(unwrap(model).forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def logits_of(output: Any) -> Tensor:
    """The logits in what a model returned: a tensor, ``.logits``, a dict's ``"logits"`` or a
    tuple's first element."""
    if isinstance(output, Tensor):
        return output
    found = getattr(output, "logits", None)
    if found is None and isinstance(output, Mapping):
        found = output.get("logits")
    if found is None and isinstance(output, (tuple, list)) and output:
        found = output[0]
    if not isinstance(found, Tensor):
        raise DataError(
            f"cannot find logits in a {type(output).__name__}: pass loss_fn=(model, batch) -> loss"
        )
    return found


def cross_entropy(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits against class indices; logits ``(..., classes)`` with labels of
    shape ``(...)`` (a sequence model's tokens) are flattened, ``-100`` labels ignored."""
    if logits.dim() > 2 and logits.shape[:-1] == y.shape:
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    return nn.functional.cross_entropy(logits.float(), y, reduction=reduction)


def default_loss(model: nn.Module, batch: Batch, temperature: float = 1.0) -> Tensor:
    """The mean loss of ``model`` on a batch (:func:`loss_from` its output)."""
    return loss_from(call(model, batch), batch, temperature)


def loss_from(output: Any, batch: Batch, temperature: float = 1.0) -> Tensor:
    """The mean loss in a model's ``output`` on ``batch``: the model's own ``.loss`` when it
    returned one (and no ``temperature`` is asked), else the cross-entropy of its logits
    (divided by ``temperature``) against the batch's labels."""
    own = own_loss(output)
    if own is not None and temperature == 1.0:
        return own
    y = labels(batch)
    if y is None:
        raise DataError("the batch has no labels: give (x, y), a dict with 'labels', or loss_fn")
    logits = logits_of(output)
    return cross_entropy(logits if temperature == 1.0 else logits / temperature, y)


def own_loss(output: Any) -> Tensor | None:
    """The loss a model returned itself (a Hugging Face output's ``.loss``), or None."""
    found = getattr(output, "loss", None)
    if found is None and isinstance(output, Mapping):
        found = output.get("loss")
    return found if isinstance(found, Tensor) else None


def loss_of(loss_fn: LossFunction | None) -> LossFunction:
    """``loss_fn``, or :func:`default_loss` when None."""
    return default_loss if loss_fn is None else loss_fn


@torch.no_grad()
def correct(output: Any, batch: Batch) -> tuple[int, int]:
    """(correct predictions, predictions) of a batch's logits against its labels (tokens for a
    sequence model, ``-100`` ignored); (0, 0) when there are no labels to compare with."""
    y = labels(batch)
    if y is None:
        return 0, 0
    logits = logits_of(output)
    if logits.dim() > 2 and logits.shape[:-1] == y.shape:
        predicted = logits.argmax(-1)
    elif logits.dim() >= 2 and logits.shape[0] == y.shape[0]:
        predicted = logits.argmax(1)
    else:
        return 0, 0
    valid = y != -100
    return int(((predicted == y) & valid).sum()), int(valid.sum())


def sample(
    data: DataSource,
    samples: int,
    batch_size: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[Batch]:
    """A seeded sample of training examples, split into batches on ``device``.

    - ``data``: a DataSplits (its training split), a pair ``(x, y)`` (a seeded random sample),
      or an iterable of batches (read in order until ``samples`` examples are taken).
    - ``per_class``: instead, that many examples of each class (class-balanced, as GraSP's
      reference code samples): from tensors by a seeded permutation, from an iterable by
      reading batches until every class seen has enough (:class:`DataError` naming a class
      that never reaches it).
    - ``batch_size``: the size of each returned batch (default: all in one batch).
    """
    data = split(data)
    if is_pair(data):
        x, y = data
        if len(x) == 0:
            raise DataError("no examples to score with (the data is empty)")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        if per_class is not None:
            ys = y[order].cpu()
            order = torch.cat([order[ys == c][:per_class] for c in torch.unique(ys).tolist()])
            order = order[torch.argsort(order)]
        else:
            order = order[:samples]
        chosen = (x[order.to(x.device)], y[order.to(y.device)])
    else:
        chosen = _read(data, samples, per_class)
    total = size(chosen)
    if total == 0:
        raise DataError("no examples to score with (the data is empty)")
    step = batch_size or total
    return [move(index(chosen, slice(i, i + step)), device) for i in range(0, total, step)]


def _read(data: Iterable[Batch], samples: int, per_class: int | None) -> Batch:
    """Batches read in order until ``samples`` examples (or ``per_class`` of every class)."""
    taken, counts = [], {}
    for batch in iterate(data):
        if per_class is None:
            taken.append(batch)
            if sum(size(b) for b in taken) >= samples:
                break
            continue
        y = labels(batch)
        if y is None:
            raise DataError("per-class sampling needs labels in the batches")
        keep = torch.zeros(len(y), dtype=torch.bool)
        for i, c in enumerate(y.reshape(len(y), -1)[:, 0].tolist()):
            if counts.get(c, 0) < per_class:
                counts[c] = counts.get(c, 0) + 1
                keep[i] = True
        if keep.any():
            taken.append(index(batch, keep.to(y.device)))
        if counts and all(n >= per_class for n in counts.values()) and len(taken) > 1:
            break
    if not taken:
        raise DataError("the data source yielded no batch")
    short = sorted(c for c, n in counts.items() if n < per_class) if per_class else []
    if short:
        raise DataError(
            f"per-class sampling found fewer than {per_class} examples of class(es) "
            f"{short[:5]} in the whole data; pass samples=... instead"
        )
    joined = concat(taken)
    return joined if per_class is not None else index(joined, slice(0, samples))


def example_input(
    data: DataSource | None, input_shape: Sequence[int] | None, device, dtype: torch.dtype
) -> Any:
    """One example's inputs for a data-free pass: a tensor of ones of ``input_shape`` (float
    ``dtype``), or, from the data, the first example's inputs with floating tensors set to
    ones (integer token ids kept as they are)."""  # fmt: skip
    if input_shape is not None:
        return torch.ones((1, *input_shape), dtype=dtype, device=device)
    if data is None:
        raise DataError("pass input_shape=(C, H, W) or the data to read one example from")
    x = inputs(index(first_batch(data), slice(0, 1)))
    return _ones_like(move(x, device), dtype)


def input_shape_of(data: DataSource) -> tuple[int, ...]:
    """One example's input shape: a DataSplits' ``input_shape``, else the first batch's inputs
    without their batch dimension (a dict batch's ``input_ids``, or its first tensor)."""
    if isinstance(data, DataSplits):
        return tuple(data.input_shape)
    x = inputs(first_batch(data))
    if isinstance(x, Mapping):
        x = x.get("input_ids", next(iter(x.values()), None))
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise DataError("cannot read an input shape from the data: pass input_shape=...")
    return tuple(x.shape[1:])


def batches_per_pass(data: DataSource, batch_size: int) -> int | None:
    """Batches of ``batch_size`` in one pass over ``data`` (a DataSplits' training split, a
    pair); an iterable's own ``len`` or None when it has none."""
    data = split(data)
    if is_pair(data):
        return -(-len(data[1]) // batch_size)
    return count(data)


def held_out(data: DataSource, examples: int = 1000) -> DataSource:
    """What to validate on: a DataSplits' validation split, else its (or the data's) first
    ``examples`` training examples."""
    if isinstance(data, DataSplits) and len(data.y_val):
        return data.x_val, data.y_val
    data = split(data)
    if is_pair(data):
        return data[0][:examples], data[1][:examples]
    return sample(data, examples)


def takes_token_ids(model: nn.Module) -> bool:
    """Whether ``model`` reads token ids: its first module with weights is an ``nn.Embedding``
    (registration order, which is the forward order of sequential and Hugging Face models)."""
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            return isinstance(module, nn.Embedding)
    return False


def zeros_input(model: nn.Module, input_shape: Sequence[int]) -> Tensor:
    """An example of batch 1 and per-sample ``input_shape`` on the model's device: token ids 0
    (int64) for a model that :func:`takes_token_ids`, else zeros in the model's float dtype."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if takes_token_ids(model):
        return torch.zeros((1, *input_shape), device=device, dtype=torch.long)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros((1, *input_shape), device=device, dtype=dtype)


def _ones_like(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, Tensor):
        return torch.ones_like(x, dtype=dtype) if x.is_floating_point() else x
    if isinstance(x, Mapping):
        return {k: _ones_like(v, dtype) for k, v in x.items()}
    return x


def count(data: DataSource) -> int | None:
    """How many batches an iterable yields per pass (``len``), or None if it does not say."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None
