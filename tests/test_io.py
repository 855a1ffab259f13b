"""The io stage: atomic writes, the one tensor container, tensor files."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from winnow import Masks
from winnow.core.masks import MaskFileError
from winnow.io import (
    TensorFileError,
    WinnowFileError,
    atomic_write_bytes,
    load_tensors,
    loads,
    read_container,
    save_tensors,
    sniff,
    tensor_metadata,
    write_container,
)


def test_atomic_write_replaces_a_planted_link_instead_of_following_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "out.bin"
    os.symlink(victim, target)
    atomic_write_bytes(target, b"new")
    assert victim.read_text() == "keep me"
    assert not target.is_symlink() and target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_write_leaves_the_old_file_on_error(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_files_are_byte_reproducible(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    metadata = {"z": 1, "a": [1, 2], "m": {"y": 2, "x": 1}}
    save_tensors(tmp_path / "1", tensors, metadata)
    save_tensors(tmp_path / "2", dict(reversed(tensors.items())), dict(reversed(metadata.items())))
    assert (tmp_path / "1").read_bytes() != b""
    assert load_tensors(tmp_path / "1").keys() == tensors.keys()
    masks = Masks({"w": torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) < 0.5})
    masks.save(tmp_path / "m1")
    masks.save(tmp_path / "m2")
    assert (tmp_path / "m1").read_bytes() == (tmp_path / "m2").read_bytes()


def test_tensor_file_round_trip_keeps_order_dtype_and_metadata(tmp_path):
    tensors = {"z": torch.randn(3), "a": torch.arange(4, dtype=torch.int16).reshape(2, 2)}
    save_tensors(tmp_path / "t", tensors, {"nan": float("nan"), "k": (1, 2)})
    loaded = load_tensors(tmp_path / "t")
    assert list(loaded) == ["z", "a"]
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert tensor_metadata(tmp_path / "t") == {"nan": None, "k": [1, 2]}


def _rewrite_header(path, change, resign=None):
    """Edit the JSON header of a container in place (keeping the arrays); ``resign``: None,
    "header" (its own checksum recomputed) or "all" (the entries' too)."""
    from safetensors import safe_open

    from winnow.io.container import _entry_digest, _header_digest

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["winnow"])
    arrays = load_file(str(path))
    change(header)
    if resign == "all":
        for name, entry in header["entries"].items():
            own = {k: a for k, a in arrays.items() if k.split("#")[0] == name}
            entry["sha256"] = _entry_digest(entry, own)
    if resign:
        header["sha256"] = _header_digest(header)
    save_file(arrays, str(path), metadata={"winnow": json.dumps(header)})


def test_a_shape_edited_in_the_header_is_detected(tmp_path):
    """The checksums cover the header fields: a mask [4, 10] edited to [4, 9] used to load
    as 4x9 and drop 4 bits."""
    path = tmp_path / "m"
    Masks({"w": torch.ones(4, 10, dtype=torch.bool)}).save(path)

    def shrink(header):
        header["entries"]["w"]["shape"] = [4, 9]

    _rewrite_header(path, shrink)
    with pytest.raises(MaskFileError, match="header checksum mismatch"):
        Masks.load(path)
    _rewrite_header(path, lambda h: None, resign="header")  # the entry's own checksum covers
    with pytest.raises(MaskFileError, match="checksum mismatch for 'w'"):  # its shape too
        Masks.load(path)
    _rewrite_header(path, lambda h: h["entries"]["w"].update(shape=[4, 20]), resign="all")
    with pytest.raises(MaskFileError, match="does not hold"):  # consistent checksums, but the
        Masks.load(path)  # bits cannot fill the shape


def test_a_tensor_file_with_a_shape_edit_is_detected(tmp_path):
    path = tmp_path / "t"
    save_tensors(path, {"w": torch.randn(8, 16)})
    _rewrite_header(path, lambda h: h["entries"]["w"].update(shape=[16, 8]))
    with pytest.raises(TensorFileError, match="checksum"):
        load_tensors(path)


def test_a_damaged_header_is_reported_as_damaged_not_foreign(tmp_path):
    path = tmp_path / "m"
    Masks({"w": torch.ones(3, dtype=torch.bool)}).save(path)
    raw = bytearray(path.read_bytes())
    at = raw.index(b'\\"order\\"')
    raw[at + 2] = ord("{")  # invalid JSON inside the header
    path.write_bytes(bytes(raw))
    assert sniff(path) == "winnow.masks"
    with pytest.raises(MaskFileError, match="damaged"):
        Masks.load(path)


def test_deep_nesting_is_an_error_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep"
    nested = "[" * 100_000 + "]" * 100_000
    text = '{"format": "winnow.tensors", "version": 2, "metadata": ' + nested + "}"
    save_file({"w": torch.ones(1)}, str(path), metadata={"winnow": text})
    with pytest.raises(TensorFileError, match="damaged"):
        tensor_metadata(path)
    with pytest.raises(ValueError, match="nested"):
        loads(nested)


def test_foreign_and_truncated_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    assert sniff(plain) is None
    with pytest.raises(TensorFileError, match="not a winnow tensor file"):
        load_tensors(plain)
    path = tmp_path / "t"
    save_tensors(path, {"w": torch.ones(100)})
    data = path.read_bytes()
    for cut in (0, 4, 8, 50, len(data) // 2, len(data) - 1):
        (tmp_path / "cut").write_bytes(data[:cut])
        with pytest.raises(WinnowFileError):
            load_tensors(tmp_path / "cut")
    (tmp_path / "huge").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    assert sniff(tmp_path / "huge") is None


def test_container_rejects_orphan_arrays_and_bad_names(tmp_path):
    with pytest.raises(ValueError, match="without an entry"):
        write_container(tmp_path / "x", "winnow.tensors", {"a": {}}, {"b": torch.ones(1)})
    with pytest.raises(ValueError, match="invalid entry name"):
        write_container(tmp_path / "x", "winnow.tensors", {"a#1": {}}, {})
    write_container(tmp_path / "x", "winnow.tensors", {"a": {"k": 1}}, {"a#p": torch.ones(2)})
    container = read_container(tmp_path / "x", "winnow.tensors")
    assert container.keys_of("a") == ["a#p"] and container.entries["a"]["k"] == 1
