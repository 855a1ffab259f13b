"""Tests for winnow.data: loaders (real and fake files), splits, normalisation, Batches."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from winnow import data
from winnow.data import Batches, DatasetNotFoundError, UnsafePickleError, load, read_idx

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(root: Path, n_train: int = 12, n_test: int = 6, gz: bool = False) -> dict:
    """Write the four IDX files of a tiny 28x28 dataset; return the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        content = idx_bytes(array)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (root / name).write_bytes(content)
    return arrays


def write_cifar(directory: Path, n: int = 4, str_keys: bool = False, protocol: int = 4) -> dict:
    """Write fake CIFAR-10 python batches (dicts of numpy arrays, bytes keys like the original)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    written = {}
    for i, name in enumerate(data.CIFAR10_BATCHES):
        batch = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img{j}.png".encode() for j in range(n)],
        }
        if str_keys:
            batch = {k.decode(): v for k, v in batch.items()}
        with (directory / name).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        written[name] = batch
    return written


class MakeDir:
    """Unpickling this object would create a directory: the side effect a test watches for."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST from Debian's package


@pytest.mark.skipif(
    not FASHION_ROOT.is_dir(),
    reason=f"Fashion-MNIST not installed in {FASHION_ROOT} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    d = load("fashion-mnist")
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (55000, 5000, 10000)
    assert d.x_train.shape == (55000, 1, 28, 28) and d.x_train.dtype == torch.float32
    assert d.input_shape == (1, 28, 28) and d.in_channels == 1 and d.num_classes == 10
    for y in (d.y_train, d.y_val, d.y_test):
        assert y.dtype == torch.int64 and int(y.min()) == 0 and int(y.max()) == 9
    assert abs(d.x_train.mean().item()) < 1e-3
    assert abs(d.x_train.std().item() - 1) < 1e-3
    assert d.mean is not None and abs(d.mean[0] - 0.286) < 1e-3  # the known pixel mean
    assert "55000 train / 5000 val / 10000 test" in d.summary()


# ---------------------------------------------------------------------------------------------
# IDX reader on fake files


@pytest.mark.parametrize("gz", [False, True])
def test_fake_idx_loads_as_mnist_and_unverified_fashion(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    for name, options in (("mnist", {}), ("fashion-mnist", {"verify": False})):
        d = load(name, root=tmp_path, val_size=2, normalize=False, **options)
        assert d.name == name
        assert d.x_train.shape == (10, 1, 28, 28) and d.x_val.shape == (2, 1, 28, 28)
        assert d.mean is None
        expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float().unsqueeze(1) / 255
        assert torch.equal(d.x_test, expected)
        assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
        assert 0 <= d.x_train.min() and d.x_train.max() <= 1


def test_read_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    for path in (tmp_path / "a", tmp_path / "a.gz"):
        out = read_idx(path)
        assert out.dtype == np.uint8 and np.array_equal(out, array)
        out[0, 0, 0] = 1  # writable, not a view of the file's bytes


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (idx_bytes(np.zeros((3, 4), np.uint8))[:-1], "truncated"),
        (idx_bytes(np.zeros((3, 4), np.uint8)) + b"\0", "trailing"),
        (b"\x08\x03" + idx_bytes(np.zeros((3, 4), np.uint8))[2:], "magic"),
        (b"\0\0\x0d\x01" + (4).to_bytes(4, "big") + bytes(16), "type code"),
        (b"\0\0\x08\x02\0\0", "header"),
        (gzip.compress(idx_bytes(np.zeros((3, 4), np.uint8)))[:-6], "gzip"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, content, problem):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_file_in_dataset_names_it(tmp_path):
    write_idx_set(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated") as info:
        load("mnist", root=tmp_path)
    assert str(labels) in str(info.value)


def test_fashion_mnist_checks_the_hash(tmp_path):
    write_idx_set(tmp_path, gz=True)
    with pytest.raises(ValueError, match="SHA-256") as info:
        load("fashion-mnist", root=tmp_path)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(info.value)
    assert "verify=False" in str(info.value)


def test_missing_directory_says_how_to_get_the_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load("fashion-mnist", root=missing)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "root=" in message
    assert str(missing / "train-images-idx3-ubyte.gz") in message


def test_missing_file_lists_the_paths_looked_at(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load("mnist", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "t10k-images-idx3-ubyte") in message
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in message
    assert str(tmp_path / "train-images-idx3-ubyte.gz") not in message


# ---------------------------------------------------------------------------------------------
# MNIST-1D, digits


def test_mnist1d_shapes_determinism_and_global_rng():
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state(), random.getstate()
    torch_state = torch.get_rng_state()
    d = load("mnist1d", num_samples=500)
    after = (np.random.rand(), random.random())
    np.random.set_state(np_state)
    random.setstate(py_state)
    assert after == (np.random.rand(), random.random())
    assert torch.equal(torch.get_rng_state(), torch_state)

    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (360, 40, 100)
    assert d.x_train.shape == (360, 1, 40) and d.input_shape == (1, 40)
    assert d.num_classes == 10 and set(d.y_test.tolist()) <= set(range(10))
    again = load("mnist1d", num_samples=500)
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_val, again.y_val)
    other = load("mnist1d", num_samples=500, dataset_seed=7)
    assert not torch.equal(d.x_test, other.x_test)


def test_digits_shapes_and_fixed_test_set():
    d = load("digits")
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (1295, 143, 359)
    assert d.x_train.shape[1:] == (1, 8, 8) and d.num_classes == 10
    raw = load("digits", normalize=False, seed=5)
    assert 0 <= raw.x_train.min() and raw.x_train.max() <= 1
    assert torch.equal(raw.x_test, load("digits", normalize=False).x_test)
    assert not torch.equal(raw.y_val, load("digits", normalize=False).y_val)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 pickle batches


def test_cifar10_from_fake_batches(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    d = load("cifar10", root=tmp_path, val_size=5, normalize=False)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (15, 5, 4)
    assert d.x_train.shape == (15, 3, 32, 32) and d.input_shape == (3, 32, 32)
    test = written["test_batch"]
    assert d.y_test.tolist() == test[b"labels"]
    assert torch.equal(d.x_test * 255, torch.from_numpy(test[b"data"]).float().view(4, 3, 32, 32))
    all_train = sum((written[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert sorted(d.y_train.tolist() + d.y_val.tolist()) == sorted(all_train)


def test_cifar10_str_keys_and_legacy_numpy_module_name(tmp_path):
    write_cifar(tmp_path, str_keys=True, protocol=3)
    for name in data.CIFAR10_BATCHES:  # as written by numpy 1 (and the original batches)
        path = tmp_path / name
        path.write_bytes(
            path.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        )
    d = load("cifar10", root=tmp_path, val_size=0)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_val.shape == (0, 3, 32, 32)


@pytest.mark.parametrize("payload", ["reduce", "class"])
def test_cifar10_refuses_malicious_pickle(tmp_path, payload):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = MakeDir(str(marker)) if payload == "reduce" else {"cls": torch.nn.Linear}
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3], b"x": evil}
    with (tmp_path / "data_batch_3").open("wb") as f:
        pickle.dump(batch, f, protocol=4)
    with pytest.raises(UnsafePickleError, match="refused global") as info:
        load("cifar10", root=tmp_path)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert ("mkdir" if payload == "reduce" else "Linear") in str(info.value)
    assert str(tmp_path / "data_batch_3") in str(info.value)
    assert not marker.exists()


def test_cifar10_missing_directory(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz") as info:
        load("cifar10", root=tmp_path / "none")
    assert str(tmp_path / "none" / "cifar-10-batches-py" / "test_batch") in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="root="):
        load("cifar10")


# ---------------------------------------------------------------------------------------------
# validation split, normalisation, limit, registry


def rows(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x.reshape(len(x), -1).tolist()}


def test_val_split_is_disjoint_sized_and_seeded():
    full = load("synthetic", val_size=0, normalize=False)
    assert full.x_val.shape == (0, 1, 8, 8) and len(full.y_train) == 512
    d = load("synthetic", val_size=100, seed=3, normalize=False)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (412, 100, 256)
    assert not rows(d.x_train) & rows(d.x_val)
    assert rows(d.x_train) | rows(d.x_val) == rows(full.x_train)
    assert torch.equal(d.x_test, full.x_test)  # the test set is never touched
    same = load("synthetic", val_size=100, seed=3, normalize=False)
    other = load("synthetic", val_size=100, seed=4, normalize=False)
    assert torch.equal(d.x_val, same.x_val) and not torch.equal(d.x_val, other.x_val)
    assert len(load("synthetic").y_val) == 51  # default: 10% of the training set
    for bad in (-1, 512):
        with pytest.raises(ValueError, match="val_size"):
            load("synthetic", val_size=bad)


def test_normalisation_uses_training_statistics_per_channel():
    d = load("synthetic", input_shape=(3, 4, 4), val_size=50)
    mean = d.x_train.mean(dim=(0, 2, 3))
    std = d.x_train.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5)
    assert torch.allclose(std, torch.ones(3), atol=1e-5)
    raw = load("synthetic", input_shape=(3, 4, 4), val_size=50, normalize=False)
    expected = (raw.x_test - torch.tensor(d.mean).view(1, 3, 1, 1)) / torch.tensor(d.std).view(
        1, 3, 1, 1
    )
    assert torch.allclose(d.x_test, expected, atol=1e-6)


def test_limit_keeps_the_first_examples_with_full_statistics():
    full = load("synthetic", val_size=100)
    d = load("synthetic", val_size=100, limit=20)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (20, 20, 20)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(d, f"x_{split}"), getattr(full, f"x_{split}")[:20])
        assert torch.equal(getattr(d, f"y_{split}"), getattr(full, f"y_{split}")[:20])
    with pytest.raises(ValueError, match="limit"):
        load("synthetic", limit=0)


def test_synthetic_is_learnable_by_nearest_class_mean():
    d = load("synthetic", normalize=False)
    x, y = d.x_train.flatten(1), d.y_train
    means = torch.stack([x[y == c].mean(0) for c in range(d.num_classes)])
    pred = torch.cdist(d.x_test.flatten(1), means).argmin(1)
    assert (pred == d.y_test).float().mean() > 0.8


def test_registry_and_errors():
    assert data.available() == [
        "cifar10",
        "digits",
        "fashion-mnist",
        "mnist",
        "mnist1d",
        "synthetic",
    ]
    with pytest.raises(ValueError, match="fashion-mnist.*synthetic"):
        load("imagenet")
    with pytest.raises(ValueError, match="unknown option.*colour"):
        load("synthetic", colour=True)


def test_datasplits_helpers():
    d = load("synthetic", input_shape=(2, 5), num_classes=3, n_train=40, n_test=10)
    assert d.in_channels == 2 and d.input_shape == (2, 5) and d.num_classes == 3
    assert d.summary() == "synthetic: 36 train / 4 val / 10 test, input (2, 5), 3 classes"
    moved = d.to("cpu")
    assert moved is not d and torch.equal(moved.x_train, d.x_train) and moved.name == d.name
    with pytest.raises(ValueError, match="float32"):
        dataclasses.replace(d, x_train=d.x_train.double())


# ---------------------------------------------------------------------------------------------
# Batches


def make_batches(n: int = 10, **kwargs) -> Batches:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return Batches(x, torch.arange(n), **kwargs)


def order(epoch) -> list[int]:
    return [int(v) for _, yb in epoch for v in yb]


def test_batches_order_is_seeded_and_covers_every_example():
    b = make_batches(batch_size=3, seed=1)
    assert len(b) == 4
    first = order(b.epoch(0))
    assert sorted(first) == list(range(10))
    assert first == order(make_batches(batch_size=3, seed=1).epoch(0))
    assert first != order(b.epoch(1))
    assert first != order(make_batches(batch_size=3, seed=2).epoch(0))
    for xb, yb in b.epoch(2):
        assert torch.equal(xb.squeeze(1).long(), yb)
    assert [len(yb) for _, yb in b.epoch(0)] == [3, 3, 3, 1]
    assert order(make_batches(batch_size=4, shuffle=False).epoch(5)) == list(range(10))


def test_batches_iteration_advances_the_epoch():
    b = make_batches(batch_size=4)
    epochs = [order(b), order(b)]
    assert b.next_epoch == 2
    assert epochs == [order(b.epoch(0)), order(b.epoch(1))]
    b.next_epoch = 1
    assert order(b) == epochs[1]


def test_batches_drop_last():
    b = make_batches(batch_size=3, drop_last=True)
    assert len(b) == 3
    assert [len(yb) for _, yb in b.epoch(0)] == [3, 3, 3]
    assert len(make_batches(n=2, batch_size=3, drop_last=True)) == 0


def test_batches_steps_resume_and_cross_epochs():
    b = make_batches(batch_size=3, seed=5)
    run = [(s, yb.tolist()) for s, _, yb in b.steps(11)]
    assert [s for s, _ in run] == list(range(11))
    resumed = [(s, yb.tolist()) for s, _, yb in make_batches(batch_size=3, seed=5).steps(7, 4)]
    assert resumed == run[4:]
    epochs = [yb.tolist() for e in range(3) for _, yb in b.epoch(e)]
    assert [y for _, y in run] == epochs[:11]


def test_batches_leave_global_rng_alone():
    state = torch.get_rng_state()
    b = make_batches(batch_size=2)
    list(b)
    list(b.steps(12))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    a = order(b.epoch(3))
    torch.manual_seed(99)
    assert order(b.epoch(3)) == a


def test_batches_validation():
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(batch_size=0)
    with pytest.raises(ValueError, match="lengths"):
        Batches(torch.zeros(3, 1), torch.zeros(4), batch_size=1)
    with pytest.raises(ValueError, match="no batches"):
        make_batches(n=2, batch_size=3, drop_last=True).steps(1)
    with pytest.raises(ValueError, match="epoch"):
        make_batches(batch_size=2).epoch(-1)
