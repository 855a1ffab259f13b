"""Datasets held as tensors, read offline, and a seeded batch iterator.

Nothing here downloads anything. File-based datasets (Fashion-MNIST, MNIST, CIFAR-10) read a
directory the caller provides and say, when the files are missing, how to get them; the others
(MNIST-1D, scikit-learn's digits, a synthetic task) are generated or bundled.

Every dataset goes through the same steps in :func:`load`:

1. the loader returns a training and a test set;
2. ``val_size`` examples are held out of the training set by a permutation seeded with ``seed``
   (the test set is never touched); both parts keep the original order of the training set;
3. per-channel mean and standard deviation are computed on the remaining training part;
4. ``limit`` keeps the first examples of each split;
5. the statistics of step 3 are applied to all three splits (``normalize=True``).

``seed`` decides the validation split and nothing else: what a generated dataset contains is
fixed by its ``dataset_seed`` option, so changing ``seed`` never changes the test set.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import inspect
import io
import math
import pickle
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "Batches",
    "DataSplits",
    "DatasetNotFoundError",
    "FASHION_MNIST_SHA256",
    "UnsafePickleError",
    "available",
    "load",
    "read_idx",
]

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
MNIST_ROOT = Path("/usr/share/datasets/mnist")

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

FASHION_MNIST_SHA256 = {
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
}
"""SHA-256 of the decompressed Fashion-MNIST IDX files."""

CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the loader looked; the message says how to get them."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global that the restricted reader does not allow."""


# ---------------------------------------------------------------------------------------------
# DataSplits


@dataclass(frozen=True, eq=False)
class DataSplits:
    """Train, validation and test tensors of one dataset.

    ``x_*`` are float32 of shape ``(N, *input_shape)`` (or integer token ids, ``(N, L)``);
    ``y_*`` are int64 class indices of shape ``(N,)`` (or ``(N, L)`` for a sequence's tokens).
    ``input_shape`` is the per-sample shape, ``(C, H, W)`` for images and ``(C, L)`` for 1-D
    signals. ``mean`` and ``std`` are the per-channel statistics that were subtracted and
    divided (computed on the training split), or ``None`` when the data was not normalised.
    ``augment`` names the augmentation :func:`winnow.train` applies to training batches
    (:data:`AUGMENTATIONS`; None: none).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: str | None = None

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            tokens = not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
            if not (x.dtype == torch.float32 or tokens) or y.dtype != torch.int64:
                raise ValueError(
                    f"{self.name} {split}: expected float32 x (or integer token ids) and int64 "
                    f"y, got {x.dtype} and {y.dtype}"
                )
            if tuple(x.shape[1:]) != tuple(self.input_shape) or y.shape[:1] != x.shape[:1]:
                raise ValueError(
                    f"{self.name} {split}: x {tuple(x.shape)} and y {tuple(y.shape)} do not "
                    f"match input_shape {tuple(self.input_shape)}"
                )
        if self.augment is not None and self.augment not in AUGMENTATIONS:
            raise ValueError(
                f"unknown augmentation {self.augment!r}; choose one of {sorted(AUGMENTATIONS)}"
            )
        if self.augment is not None and len(self.input_shape) != 3:
            raise ValueError(
                f"augmentation {self.augment!r} needs images (C, H, W), not input shape "
                f"{tuple(self.input_shape)}"
            )

    @property
    def in_channels(self) -> int:
        """Number of input channels (the first entry of ``input_shape``)."""
        return self.input_shape[0]

    def summary(self) -> str:
        """One line: name, split sizes, per-sample shape, number of classes."""
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_val)} val / "
            f"{len(self.y_test)} test, input {tuple(self.input_shape)}, "
            f"{self.num_classes} classes"
        )

    def to(self, device: torch.device | str) -> DataSplits:
        """Return a copy whose six tensors live on ``device``."""
        moved = {
            f"{p}_{s}": getattr(self, f"{p}_{s}").to(device)
            for p in ("x", "y")
            for s in ("train", "val", "test")
        }
        return dataclasses.replace(self, **moved)


# ---------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)


def _read_bytes(path: Path) -> bytes:
    """Return the content of ``path``, decompressed if it is gzip (detected by its magic bytes)."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def _parse_idx(data: bytes, source: Path | str) -> np.ndarray:
    if len(data) < 4:
        raise ValueError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{source}: bad IDX magic {data[:4].hex()} (expected 0000 followed by a type code "
            "and the number of dimensions)"
        )
    if data[2] != 0x08:
        raise ValueError(
            f"{source}: unsupported IDX data type code 0x{data[2]:02x} "
            "(only 0x08, unsigned byte, is supported)"
        )
    ndim = data[3]
    if ndim == 0:
        raise ValueError(f"{source}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    payload = len(data) - header
    if payload != expected:
        problem = "truncated" if payload < expected else "has trailing bytes"
        raise ValueError(
            f"{source}: IDX payload {problem}: {payload} bytes for dimensions {dims} "
            f"({expected} expected)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzip) of unsigned bytes into a ``uint8`` array.

    The header is ``00 00 08 <ndim>`` followed by ``ndim`` big-endian 32-bit sizes; the payload
    must hold exactly the product of the sizes. A bad magic, another data type, a truncated
    header or payload, or trailing bytes raise ``ValueError`` naming the file.
    """
    path = Path(path)
    return _parse_idx(_read_bytes(path), path)


def _find_files(root: Path, names: tuple[str, ...]) -> tuple[dict[str, Path], list[Path]]:
    """Locate each name in root as a plain file or with ``.gz``; also return paths looked at."""
    found: dict[str, Path] = {}
    missing: list[Path] = []
    for name in names:
        candidates = [root / name, root / f"{name}.gz"]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.extend(candidates)
        else:
            found[name] = hit
    return found, missing


class _Raw(NamedTuple):
    """What a loader returns: images in [0, 1] (or the generator's scale), labels, class count."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, C, H, W)`` -> float32 ``(N, C, H, W)`` in [0, 1]."""
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    return x.unsqueeze(1) if x.ndim == 3 else x


def _labels_to_tensor(labels: np.ndarray, num_classes: int, source: Path | str) -> torch.Tensor:
    y = torch.from_numpy(np.asarray(labels).astype(np.int64)).reshape(-1)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{source}: labels outside 0..{num_classes - 1} (found {int(y.min())}..{int(y.max())})"
        )
    return y


def _load_idx_dataset(
    title: str, root: Path, hashes: dict[str, str] | None, how_to_get: str
) -> _Raw:
    if not root.is_dir():
        looked = [str(root / n) + suffix for n in IDX_FILES for suffix in ("", ".gz")]
        raise DatasetNotFoundError(
            f"{title}: directory {root} does not exist (looked for {', '.join(looked)}). "
            f"{how_to_get}"
        )
    found, missing = _find_files(root, IDX_FILES)
    if missing:
        raise DatasetNotFoundError(
            f"{title}: missing IDX files in {root}; looked at {', '.join(map(str, missing))}. "
            f"{how_to_get}"
        )
    arrays = {}
    for name, path in found.items():
        data = _read_bytes(path)
        if hashes is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != hashes[name]:
                raise ValueError(
                    f"{path}: SHA-256 of the decompressed content is {digest}, expected "
                    f"{hashes[name]} for {title}'s {name}; the file is corrupt or not "
                    f"{title} (pass verify=False to skip the check)"
                )
        arrays[name] = _parse_idx(data, path)
    splits = []
    for prefix in ("train", "t10k"):
        images = arrays[f"{prefix}-images-idx3-ubyte"]
        labels = arrays[f"{prefix}-labels-idx1-ubyte"]
        image_path, label_path = (
            found[f"{prefix}-images-idx3-ubyte"],
            found[f"{prefix}-labels-idx1-ubyte"],
        )
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{image_path} and {label_path}: expected images (N, H, W) and labels (N,), "
                f"got {images.shape} and {labels.shape}"
            )
        splits += [_images_to_tensor(images), _labels_to_tensor(labels, 10, label_path)]
    return _Raw(*splits, num_classes=10)


def _load_fashion_mnist(*, root: str | Path | None = None, verify: bool = True) -> _Raw:
    return _load_idx_dataset(
        "Fashion-MNIST",
        Path(root) if root is not None else FASHION_MNIST_ROOT,
        FASHION_MNIST_SHA256 if verify else None,
        "Install Debian's package (apt-get install dataset-fashion-mnist), which puts the files "
        f"in {FASHION_MNIST_ROOT}, or pass root= to a directory holding the four IDX files "
        f"({', '.join(IDX_FILES)}), plain or .gz.",
    )


def _load_mnist(*, root: str | Path | None = None) -> _Raw:
    return _load_idx_dataset(
        "MNIST",
        Path(root) if root is not None else MNIST_ROOT,
        None,
        "Copy the four MNIST IDX files "
        f"({', '.join(IDX_FILES)}), plain or .gz, into {MNIST_ROOT} or pass root= to their "
        "directory.",
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches, read with a restricted unpickler)


class _ArrayType:
    """What the unpickler hands out for ``numpy.ndarray``: only :func:`_empty_array` accepts
    it, so a pickle can name the array type but never call it (``numpy.ndarray(shape)`` would
    allocate ``shape`` of uninitialised memory from a file of a few bytes)."""


def _empty_array(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` as its pickles use it: an empty array whose contents the
    pickle's state then fills. Anything else (another type, a non-empty shape) is refused."""
    if subtype is not _ArrayType or tuple(shape) != (0,):
        raise UnsafePickleError("refused an array reconstruction that is not numpy's own")
    return np.ndarray((0,), dtype=np.uint8)


def _plain_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype`` for plain numbers only (object dtypes would unpickle Python objects)."""
    if not isinstance(spec, (str, bytes)):
        raise UnsafePickleError(f"refused dtype {spec!r}")
    dtype = np.dtype(spec.decode("latin1") if isinstance(spec, bytes) else spec)
    if dtype.kind not in "biuf":
        raise UnsafePickleError(f"refused dtype {dtype}: a CIFAR-10 batch holds numbers only")
    return dtype


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild plain numpy arrays.

    Dicts, lists, ints, bytes and str need no global; a numpy array needs its reconstructor,
    ``numpy.ndarray`` and ``numpy.dtype``, and gets stand-ins for them: the reconstructor makes
    only the empty array numpy's pickles start from, the array type cannot be called, and
    dtypes are plain numbers. The array's contents then come from its pickled state, which
    numpy checks against the declared shape, so every array's bytes are in the file. Every
    other global (a function to call, a class to instantiate) raises
    :class:`UnsafePickleError` before anything is executed.
    """

    _STAND_INS = {
        ("numpy.core.multiarray", "_reconstruct"): _empty_array,
        ("numpy._core.multiarray", "_reconstruct"): _empty_array,
        ("numpy", "ndarray"): _ArrayType,
        ("numpy", "dtype"): _plain_dtype,
    }

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._STAND_INS:
            raise UnsafePickleError(
                f"{self._source}: refused global {module}.{name}; a CIFAR-10 batch holds only "
                "dicts, lists, bytes, ints and numpy arrays, so this file is not one (or has been "
                "tampered with)"
            )
        return self._STAND_INS[(module, name)]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as f:
        try:
            batch = _ArrayOnlyUnpickler(f, path).load()
        except UnsafePickleError as err:
            message = str(err)
            raise UnsafePickleError(
                message if message.startswith(str(path)) else f"{path}: {message}"
            ) from None
        except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as err:
            raise ValueError(f"{path}: not a readable CIFAR-10 batch ({err})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    entries = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in entries or "labels" not in entries:
        raise ValueError(f"{path}: expected keys 'data' and 'labels', got {sorted(entries)}")
    data, labels = entries["data"], np.asarray(entries["labels"])
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or labels.shape != (data.shape[0],)
    ):
        shape = getattr(data, "shape", None)
        raise ValueError(
            f"{path}: expected uint8 data (N, 3072) and N labels, got data "
            f"{type(data).__name__} {shape} {getattr(data, 'dtype', '')} and labels {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(*, root: str | Path | None = None) -> _Raw:
    how_to_get = (
        "Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html on a "
        "machine with network access, extract it (tar xzf cifar-10-python.tar.gz) and pass "
        "root= to the directory cifar-10-batches-py or its parent."
    )
    if root is None:
        raise DatasetNotFoundError(f"CIFAR-10 has no default location. {how_to_get}")
    root = Path(root)
    candidates = [root, root / "cifar-10-batches-py"]
    directory = next((d for d in candidates if (d / "test_batch").is_file()), None)
    if directory is None:
        looked = [str(d / "test_batch") for d in candidates]
        raise DatasetNotFoundError(
            f"CIFAR-10: no batches found; looked at {', '.join(looked)}. {how_to_get}"
        )
    missing = [str(directory / n) for n in CIFAR10_BATCHES if not (directory / n).is_file()]
    if missing:
        raise DatasetNotFoundError(f"CIFAR-10: missing {', '.join(missing)}. {how_to_get}")
    train = [_read_cifar_batch(directory / n) for n in CIFAR10_BATCHES[:-1]]
    test_x, test_y = _read_cifar_batch(directory / "test_batch")
    return _Raw(
        _images_to_tensor(np.concatenate([x for x, _ in train])),
        _labels_to_tensor(np.concatenate([y for _, y in train]), 10, directory),
        _images_to_tensor(test_x),
        _labels_to_tensor(test_y, 10, directory / "test_batch"),
        num_classes=10,
    )


# ---------------------------------------------------------------------------------------------
# Generated and bundled datasets


def _load_mnist1d(*, num_samples: int = 5000, dataset_seed: int = 42) -> _Raw:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError("MNIST-1D needs the mnist1d package: pip install winnow[data]") from exc
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = dataset_seed
    # make_dataset reseeds numpy's and Python's global generators: leave them as they were.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def x(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).unsqueeze(1)

    return _Raw(
        x(data["x"]),
        _labels_to_tensor(data["y"], 10, "mnist1d"),
        x(data["x_test"]),
        _labels_to_tensor(data["y_test"], 10, "mnist1d"),
        num_classes=10,
    )


def _load_digits(*, dataset_seed: int = 0) -> _Raw:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "The digits dataset needs scikit-learn: pip install winnow[data]"
        ) from exc
    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = _labels_to_tensor(bunch.target, 10, "digits")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(dataset_seed))
    n_test = len(y) // 5
    test, train = order[:n_test].sort().values, order[n_test:].sort().values
    return _Raw(x[train], y[train], x[test], y[test], num_classes=10)


def _load_synthetic(
    *,
    n_train: int = 512,
    n_test: int = 256,
    input_shape: tuple[int, ...] = (1, 8, 8),
    num_classes: int = 4,
    separation: float = 3.0,
    dataset_seed: int = 0,
) -> _Raw:
    input_shape = tuple(int(s) for s in input_shape)
    if not input_shape or min(input_shape) < 1 or num_classes < 2 or min(n_train, n_test) < 0:
        raise ValueError(
            f"synthetic: need a non-empty input_shape of positive sizes, num_classes >= 2 and "
            f"n_train, n_test >= 0; got {input_shape}, {num_classes}, {n_train}, {n_test}"
        )
    g = torch.Generator().manual_seed(dataset_seed)
    means = torch.randn(num_classes, math.prod(input_shape), generator=g)
    means *= separation / means.norm(dim=1, keepdim=True)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(num_classes, (n,), generator=g)
        x = means[y] + torch.randn(n, means.shape[1], generator=g)
        return x.reshape(n, *input_shape), y

    return _Raw(*sample(n_train), *sample(n_test), num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# Registry and load()


class _Spec(NamedTuple):
    loader: Callable[..., _Raw]
    default_val: int | float  # an int is a count, a float a fraction of the training set


_REGISTRY: dict[str, _Spec] = {
    "fashion-mnist": _Spec(_load_fashion_mnist, 5000),
    "mnist": _Spec(_load_mnist, 5000),
    "mnist1d": _Spec(_load_mnist1d, 0.1),
    "digits": _Spec(_load_digits, 0.1),
    "cifar10": _Spec(_load_cifar10, 5000),
    "synthetic": _Spec(_load_synthetic, 0.1),
}


def available() -> list[str]:
    """Names accepted by :func:`load`."""
    return sorted(_REGISTRY)


def _first(t: torch.Tensor, limit: int | None) -> torch.Tensor:
    # clone so that a small slice does not keep the whole dataset's storage alive
    return t[:limit].clone() if limit is not None and limit < len(t) else t


def load(
    name: str,
    root: str | Path | None = None,
    val_size: int | None = None,
    seed: int = 0,
    normalize: bool = True,
    limit: int | None = None,
    augment: str | None = None,
    **options: Any,
) -> DataSplits:
    """Load a dataset as train / validation / test tensors. Nothing is downloaded.

    Names (see :func:`available`) and their options:

    - ``fashion-mnist``: the four IDX files (plain or ``.gz``) in ``root``, by default
      ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``). The SHA-256 of
      each decompressed file is checked unless ``verify=False``. Images ``(1, 28, 28)``.
    - ``mnist``: the same IDX reader, default root ``/usr/share/datasets/mnist``; no checksum.
    - ``cifar10``: the python batches (``data_batch_1..5``, ``test_batch``) in ``root`` or
      ``root/cifar-10-batches-py``, read by an unpickler that only rebuilds numpy arrays.
      ``root`` is required. Images ``(3, 32, 32)``.
    - ``mnist1d``: generated by the ``mnist1d`` package (Greydanus 2020); ``num_samples=5000``
      (80% train, 20% test), ``dataset_seed=42`` (42 is the standard set). Signals ``(1, 40)``,
      already standardised by the generator.
    - ``digits``: scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1] by /16;
      a 80/20 train/test split by a permutation seeded with ``dataset_seed=0``.
    - ``synthetic``: ``n_train=512, n_test=256, input_shape=(1, 8, 8), num_classes=4,
      separation=3.0, dataset_seed=0``; Gaussian classes of unit variance whose means have
      norm ``separation``, for tests.

    ``root`` is ignored by the generated datasets (mnist1d, digits, synthetic).

    Args:
        val_size: examples held out of the training set for validation, chosen by a
            permutation seeded with ``seed``; ``0`` gives empty validation tensors. Default:
            5,000 for fashion-mnist, mnist and cifar10 (as in Frankle & Carbin 2019), 10% of the
            training set otherwise.
        seed: seeds the validation split only (never the test set or a dataset's content).
        normalize: subtract the per-channel mean and divide by the per-channel standard
            deviation, both computed on the training split after the validation split was
            removed (and before ``limit``). ``False`` keeps raw values (images in [0, 1]).
        limit: keep only the first ``limit`` examples of each split.
        augment: an augmentation of the training batches (:data:`AUGMENTATIONS`), e.g.
            ``"crop-flip"``, the CIFAR augmentation of the ResNet, VGG and pruning papers.

    Raises:
        ValueError: unknown name or option, a bad ``val_size`` or ``limit``, or a corrupt file.
        DatasetNotFoundError: the files are missing (the message says where it looked and how to
            get them).
        ImportError: an optional dependency is missing (``pip install winnow[data]``).
    """
    key = name.lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available())}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    raw = _read(key, root, options)
    x_train, y_train, x_val, y_val = _hold_out(key, raw, val_size, seed)
    xs = [_first(t, limit) for t in (x_train, x_val, raw.x_test)]
    ys = [_first(t, limit) for t in (y_train, y_val, raw.y_test)]
    mean = std = None
    if normalize:
        xs, mean, std = _standardised(xs, x_train)
    return DataSplits(
        name=key,
        x_train=xs[0],
        y_train=ys[0],
        x_val=xs[1],
        y_val=ys[1],
        x_test=xs[2],
        y_test=ys[2],
        num_classes=raw.num_classes,
        input_shape=tuple(raw.x_train.shape[1:]),
        mean=mean,
        std=std,
        augment=augment,
    )


def _read(key: str, root: str | Path | None, options: dict[str, Any]) -> _Raw:
    """Call the dataset's loader with its options (``ValueError`` for one it does not take)."""
    loader = _REGISTRY[key].loader
    parameters = inspect.signature(loader).parameters
    accepted = set(parameters) - {"root"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"unknown option(s) for {key}: {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(accepted)) or 'none'}"
        )
    if "root" in parameters:
        options = {**options, "root": root}
    return loader(**options)


def _hold_out(key: str, raw: _Raw, val_size: int | None, seed: int):
    """(x_train, y_train, x_val, y_val): ``val_size`` training examples (the dataset's default
    when None) held out for validation by a permutation seeded with ``seed``."""
    n = len(raw.y_train)
    if val_size is None:
        default = _REGISTRY[key].default_val
        val_size = int(default * n) if isinstance(default, float) else default
    if not 0 <= val_size < n:
        raise ValueError(
            f"val_size must be in [0, {n}) for {key}'s {n} training examples, got {val_size}"
        )
    x_train, y_train = raw.x_train, raw.y_train
    if not val_size:
        return x_train, y_train, x_train[:0], y_train[:0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    return x_train[train_idx], y_train[train_idx], x_train[val_idx], y_train[val_idx]


def _standardised(xs: list[torch.Tensor], x_train: torch.Tensor):
    """``xs`` standardised per channel with the statistics of the whole training split
    (before any limit; a constant channel is only centred); and the mean and std used."""
    dims = [0, *range(2, x_train.ndim)]
    var, mu = torch.var_mean(x_train, dim=dims, correction=0)
    sigma = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
    shape = (1, -1) + (1,) * (x_train.ndim - 2)
    xs = [(x - mu.reshape(shape)) / sigma.reshape(shape) for x in xs]
    return xs, tuple(mu.tolist()), tuple(sigma.tolist())


# ---------------------------------------------------------------------------------------------
# Augmentation


def crop_flip(
    x: torch.Tensor,
    generator: torch.Generator,
    padding: int = 4,
    fill: tuple[float, ...] | float = 0.0,
) -> torch.Tensor:
    """Images randomly cropped from a ``padding``-pixel border and flipped left-right with
    probability 1/2: the CIFAR augmentation of He et al. (2016) that the pruning papers train
    with (4-pixel padding; torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``).

    ``x`` is ``(N, C, H, W)``; each image gets its own offsets from ``generator``. ``fill`` is the
    border's value per channel: a raw black pixel, i.e. ``-mean / std`` for normalised images.
    """
    n, c, h, w = x.shape
    fill_value = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    padded = fill_value.expand(c, h + 2 * padding, w + 2 * padding).repeat(n, 1, 1, 1)
    padded[:, :, padding : padding + h, padding : padding + w] = x
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    device = x.device
    return padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows.to(device)[:, None, :, None],
        cols.to(device)[:, None, None, :],
    ]


AUGMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {"crop-flip": crop_flip}
"""Augmentations of training batches by name: ``f(x, generator, fill=...) -> x``."""


def augmenter(splits: DataSplits) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """The augmentation ``splits.augment`` names, its border filled with a raw black pixel."""
    if splits.augment is None:
        return None
    function = AUGMENTATIONS[splits.augment]
    if splits.mean is not None and splits.std is not None:
        fill = tuple(-m / s for m, s in zip(splits.mean, splits.std, strict=True))
    else:
        fill = 0.0
    return lambda x, generator: function(x, generator, fill=fill)


# ---------------------------------------------------------------------------------------------
# Batches


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed derived from (seed, epoch), the same on every machine and Python run."""
    digest = hashlib.blake2b(f"winnow.Batches/{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


class Batches:
    """Mini-batches over tensors, in an order that depends only on ``(seed, epoch)``.

    Each epoch's order is a permutation drawn from its own ``torch.Generator`` seeded by
    ``(seed, epoch)``: it never reads or changes the global RNG, and a run resumed at epoch ``e``
    (or step ``k``, see :meth:`steps`) sees the same batches as an uninterrupted one.
    ``shuffle=False`` keeps the tensors' order. ``len()`` is the number of batches per epoch;
    with ``drop_last`` a final incomplete batch is left out.

    Iterating the object yields the batches of epoch :attr:`next_epoch` and advances it by one;
    set :attr:`next_epoch` to resume. ``augment(x, generator)`` transforms each batch's inputs
    with a generator seeded by ``(seed, step)``, so augmented runs resume exactly too.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if len(x) != len(y):
            raise ValueError(f"x and y have different lengths: {len(x)} and {len(y)}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.augment = augment
        self.next_epoch = 0

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self, epoch: int) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(len(self.x), generator=g).to(self.x.device)

    def _batch(
        self, order: torch.Tensor | None, b: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = b * self.batch_size, (b + 1) * self.batch_size
        if order is None:
            xb, yb = self.x[lo:hi], self.y[lo:hi]
        else:
            idx = order[lo:hi]
            xb, yb = self.x[idx], self.y[idx.to(self.y.device)]
        if self.augment is not None:
            seed = _epoch_seed(self.seed, step) ^ 0x5A17  # apart from the epoch orders' seeds
            xb = self.augment(xb, torch.Generator().manual_seed(seed))
        return xb, yb

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over the ``(xb, yb)`` batches of epoch ``e``; :attr:`next_epoch` is unchanged."""
        if e < 0:
            raise ValueError(f"epoch must be >= 0, got {e}")
        return self._iter_epoch(e)

    def _iter_epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order(e)
        for b in range(len(self)):
            yield self._batch(order, b, e * len(self) + b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        e = self.next_epoch
        self.next_epoch += 1
        return self.epoch(e)

    def steps(self, n: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(step, xb, yb)`` for ``step`` in ``[start, start + n)``, across epochs.

        Step ``s`` is batch ``s % len(self)`` of epoch ``s // len(self)``, so the batches depend
        only on ``(seed, step)``: ``steps(n, start=k)`` equals the tail of ``steps(n + k)``.
        """
        if n < 0 or start < 0:
            raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
        per_epoch = len(self)
        if n and per_epoch == 0:
            raise ValueError(
                f"no batches per epoch ({len(self.x)} examples, batch_size {self.batch_size}, "
                f"drop_last={self.drop_last})"
            )
        return self._iter_steps(n, start, per_epoch)

    def _iter_steps(
        self, n: int, start: int, per_epoch: int
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        epoch, order = -1, None
        for step in range(start, start + n):
            e, b = divmod(step, per_epoch)
            if e != epoch:
                epoch, order = e, self._order(e)
            xb, yb = self._batch(order, b, step)
            yield step, xb, yb
