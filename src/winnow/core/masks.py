"""Masks: which weights of a model are kept, as plain data.

A :class:`Masks` maps fully qualified parameter names (the names of ``named_parameters`` and
``state_dict``) to boolean tensors of the same shapes: ``True`` keeps a weight, ``False`` prunes
it. Masks move between the steps of a pruning pipeline (criterion -> selection -> masks ->
enforcement -> export); they can be saved, compared, combined and applied.

Conventions: *density* is the fraction kept, *sparsity* the fraction removed. Which weights
are prunable by default (the weight matrices of linear, convolutional, recurrent, attention and
token-embedding layers; never biases or normalisation parameters) is said in
:mod:`winnow.core.prunable`.

Enforcement during training lives in :mod:`winnow.core.enforcement`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from winnow.core.nm import Pattern, nm_violations
from winnow.core.prunable import named_parameters, prunable_parameters
from winnow.io import WinnowFileError, read_container, write_container

FILE_FORMAT = "winnow.masks"


class MaskFileError(WinnowFileError):
    """A mask file is truncated, corrupted, or not a winnow mask file."""


class Masks(Mapping[str, Tensor]):
    """Boolean keep-masks by parameter name (``True`` = kept).

    Immutable in spirit: operations return new ``Masks``. Build one with
    :meth:`Masks.ones` (everything kept) or from a mapping of boolean tensors.

    ``patterns`` records, for masks chosen with an N:M pattern (:mod:`winnow.core.nm`), the
    pattern and the input dimension of each tensor: name -> ``(n, m, dim)``; it is saved with
    the masks and checked by :meth:`check_patterns`. Combining masks drops it.
    """

    def __init__(
        self,
        masks: Mapping[str, Tensor],
        patterns: Mapping[str, tuple[int, int, int]] | None = None,
    ):
        checked: dict[str, Tensor] = {}
        for name, mask in masks.items():
            if not isinstance(mask, Tensor):
                raise TypeError(f"mask {name!r} is a {type(mask).__name__}, not a tensor")
            if mask.dtype != torch.bool:
                raise TypeError(f"mask {name!r} has dtype {mask.dtype}; masks are torch.bool")
            checked[name] = mask.detach()
        self._masks = checked
        self.patterns: dict[str, tuple[int, int, int]] = {}
        for name, pattern in (patterns or {}).items():
            if name not in checked:
                raise ValueError(f"a pattern is given for {name!r}, which has no mask")
            n, m, dim = (int(v) for v in pattern)
            self.patterns[name] = (n, m, dim)

    def check_patterns(self) -> None:
        """``ValueError`` naming a mask that keeps more than N of M where its pattern says N:M."""
        for name, (n, m, dim) in self.patterns.items():
            broken = nm_violations(self[name], Pattern(n, m), dim, name)
            if broken:
                raise ValueError(f"mask {name!r} breaks its {n}:{m} pattern in {broken} groups")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def ones(cls, model: nn.Module, names: Iterable[str] | None = None) -> Masks:
        """Masks that keep every prunable weight of ``model`` (see :func:`prunable_parameters`)."""
        params = prunable_parameters(model, names)
        return cls({n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()})

    @classmethod
    def from_model_zeros(cls, model: nn.Module, names: Iterable[str] | None = None) -> Masks:
        """Masks that keep exactly the non-zero prunable weights of ``model``."""
        params = prunable_parameters(model, names)
        return cls({n: p.detach() != 0 for n, p in params.items()})

    # -- mapping -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"Masks({len(self)} tensors, density={self.density():.4g})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Masks):
            return NotImplemented
        return list(self) == list(other) and all(
            self[n].shape == other[n].shape and torch.equal(self[n].cpu(), other[n].cpu())
            for n in self
        )

    __hash__ = None  # type: ignore[assignment]

    # -- statistics --------------------------------------------------------------------------
    def numel(self) -> int:
        """Total number of maskable weights."""
        return sum(m.numel() for m in self._masks.values())

    def num_kept(self) -> int:
        """Number of kept weights (``True`` entries)."""
        return int(sum(int(m.sum()) for m in self._masks.values()))

    def density(self) -> float:
        """Global density: kept weights / all maskable weights, in [0, 1]."""
        total = self.numel()
        return self.num_kept() / total if total else 1.0

    def sparsity(self) -> float:
        """Global sparsity: 1 - density."""
        return 1.0 - self.density()

    def layer_density(self) -> dict[str, float]:
        """Density of each tensor: kept / numel, in [0, 1]."""
        return {n: (float(m.sum()) / m.numel() if m.numel() else 1.0) for n, m in self.items()}

    def collapsed_layers(self) -> list[str]:
        """Names of the tensors with no kept weight (layer collapse: the network is cut)."""
        return [n for n, m in self.items() if m.numel() and not bool(m.any())]

    def summary(self) -> str:
        """A readable per-layer table: shape, kept / total and density."""
        rows = [("parameter", "shape", "kept", "total", "density")]
        for name, mask in self.items():
            kept = int(mask.sum())
            rows.append(
                (
                    name,
                    "x".join(map(str, mask.shape)),
                    f"{kept:,}",
                    f"{mask.numel():,}",
                    f"{kept / max(mask.numel(), 1):.2%}",
                )
            )
        rows.append(
            ("total", "", f"{self.num_kept():,}", f"{self.numel():,}", f"{self.density():.2%}")
        )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for i, row in enumerate(rows):
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
            lines.append("  ".join(cells).rstrip())
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    # -- comparison and algebra --------------------------------------------------------------
    def _check_compatible(self, other: Masks) -> None:
        if list(self) != list(other):
            raise ValueError(
                f"masks cover different parameters: {sorted(set(self) ^ set(other))[:5]}"
            )
        for n in self:
            if self[n].shape != other[n].shape:
                raise ValueError(
                    f"mask {n!r} has shape {tuple(self[n].shape)} here and "
                    f"{tuple(other[n].shape)} in the other"
                )

    def _combine(self, other: Masks, op) -> Masks:
        self._check_compatible(other)
        return Masks({n: op(self[n], other[n].to(self[n].device)) for n in self})

    def __and__(self, other: Masks) -> Masks:
        return self._combine(other, torch.logical_and)

    def __or__(self, other: Masks) -> Masks:
        return self._combine(other, torch.logical_or)

    def __invert__(self) -> Masks:
        return Masks({n: ~m for n, m in self.items()})

    def intersection(self, other: Masks) -> Masks:
        """Weights kept by both."""
        return self & other

    def union(self, other: Masks) -> Masks:
        """Weights kept by either."""
        return self | other

    def hamming(self, other: Masks) -> int:
        """Number of entries on which the two masks disagree."""
        self._check_compatible(other)
        return int(sum(int((self[n] ^ other[n].to(self[n].device)).sum()) for n in self))

    def overlap(self, other: Masks) -> float:
        """Jaccard overlap of the kept sets, |A ∩ B| / |A ∪ B| in [0, 1] (1 if both empty)."""
        union = (self | other).num_kept()
        return (self & other).num_kept() / union if union else 1.0

    def layer_overlap(self, other: Masks) -> dict[str, float]:
        """Per-tensor Jaccard overlap of the kept sets."""
        both, either = self & other, self | other
        return {
            n: (float(both[n].sum()) / float(either[n].sum()) if bool(either[n].any()) else 1.0)
            for n in self
        }

    # -- model interaction -------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The model's parameters for these masks (a wrapped model's, by their plain names:
        see :func:`winnow.core.prunable.unwrap`); ``ValueError`` on a missing name or shape."""
        params = named_parameters(model, self, what="mask")
        for name, mask in self.items():
            if params[name].shape != mask.shape:
                raise ValueError(
                    f"mask {name!r} has shape {tuple(mask.shape)} but the parameter has "
                    f"{tuple(params[name].shape)}"
                )
        return params

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of ``model`` in place and return it.

        This zeroes once; to keep them at zero while training use :func:`winnow.enforce`.
        """
        for name, param in self.check_model(model).items():
            param.masked_fill_(~self[name].to(param.device), 0)
        return model

    def to(self, device: torch.device | str) -> Masks:
        """A copy with every mask on ``device``."""
        return Masks({n: m.to(device) for n, m in self.items()}, self.patterns)

    def cpu(self) -> Masks:
        return self.to("cpu")

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the masks to ``path``: a ``winnow.masks`` container (safetensors; bits packed
        8 per byte; each mask's shape and a checksum over shape and bits in the JSON header).

        The file is written to a temporary name and renamed, so a crash never leaves half a
        file; the same masks always give the same bytes.
        """
        entries, arrays = {}, {}
        for name, mask in self.items():
            arrays[name] = torch.from_numpy(np.packbits(mask.cpu().numpy().reshape(-1)))
            entries[name] = {"shape": list(mask.shape)}
            if name in self.patterns:
                entries[name]["pattern"] = list(self.patterns[name])
        write_container(path, FILE_FORMAT, entries, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> Masks:
        """Read masks written by :meth:`save` (or by winnow 0.1); never unpickles.

        Raises :class:`MaskFileError` (a ``ValueError``) naming the problem for a truncated or
        corrupted file, a checksum mismatch, or a file that is not a winnow mask file.
        """
        container = read_container(path, FILE_FORMAT, error=MaskFileError, what="winnow mask file")
        masks, patterns = {}, {}
        for name in container.order:
            pattern = container.entries[name].get("pattern")
            if pattern is not None:
                if not (
                    isinstance(pattern, list)
                    and len(pattern) == 3
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in pattern)
                    and 0 <= pattern[0] <= pattern[1]
                    and pattern[1] >= 1
                ):
                    raise MaskFileError(f"{container.path}: invalid N:M pattern for {name!r}")
                patterns[name] = tuple(pattern)
            shape = container.entries[name].get("shape")
            if not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 48 for s in shape
            ):
                raise MaskFileError(f"{container.path}: invalid shape for mask {name!r}")
            count = math.prod(shape)
            packed = container.arrays.get(name)
            if (
                container.keys_of(name) != [name]
                or packed.dtype != torch.uint8
                or (packed.dim() != 1 or packed.numel() != (count + 7) // 8)
            ):
                raise MaskFileError(
                    f"{container.path}: mask {name!r} does not hold {tuple(shape)} bits"
                )
            bits = np.unpackbits(packed.numpy(), count=count).astype(bool).reshape(shape)
            masks[name] = torch.from_numpy(bits).to(device)
        try:
            return cls(masks, patterns)
        except ValueError as err:
            raise MaskFileError(f"{container.path}: {err}") from None
