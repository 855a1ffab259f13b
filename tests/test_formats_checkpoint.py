"""Sparse checkpoints: exact round trips of pruned models, hostile files, and the CLI."""

import json
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import winnow
from winnow import Masks, models, prunable_parameters
from winnow.cli import main
from winnow.formats import FORMATS, SparseFileError, inspect_sparse, load_sparse, save_sparse
from winnow.io.container import _entry_digest, _header_digest

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def pruned(name: str, density: float, seed: int = 0) -> torch.nn.Module:
    model = models.create(name, num_classes=10, in_channels=1, input_size=28, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    Masks(
        {
            n: torch.rand(p.shape, generator=gen) < density
            for n, p in prunable_parameters(model).items()
        }
    ).apply(model)
    return model


def same_state(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


def read_raw(path):
    with safe_open(str(path), framework="numpy") as f:
        header = json.loads(f.metadata()["winnow"])
    return load_file(str(path)), header


def write_raw(path, arrays, header, sign=True):
    """Write a checkpoint from raw parts; with ``sign`` its checksums are recomputed (a
    crafted file that only the field checks and the decoders can refuse)."""
    if sign:
        for name, entry in header["entries"].items():
            own = {k: torch.from_numpy(a) for k, a in arrays.items() if k.split("#")[0] == name}
            entry["sha256"] = _entry_digest(entry, own)
        header["sha256"] = _header_digest(header)
    save_file(arrays, str(path), metadata={"winnow": json.dumps(header)})


@pytest.fixture(scope="module")
def lenet300_file(tmp_path_factory):
    model = pruned("lenet300", 0.1)
    path = tmp_path_factory.mktemp("sparse") / "lenet300.sparse"
    save_sparse(model, path)
    return model, path


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
@pytest.mark.parametrize("compress_values", [False, True])
def test_pruned_model_round_trip_into_a_fresh_model(tmp_path, name, compress_values):
    model = pruned(name, 0.05)
    path = tmp_path / "model.sparse"
    infos = winnow.save_sparse(model, path, compress_values=compress_values)
    state = winnow.load_sparse(path)
    assert same_state(state, model.state_dict())
    fresh = models.create(name, num_classes=10, in_channels=1, input_size=28, seed=123)
    fresh.load_state_dict(state)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fresh(x), model(x))
    weights = [i for i in infos if i.name.endswith("weight")]
    assert all(i.format != "dense" for i in weights)
    total = sum(i.nbytes for i in weights)
    dense = sum(i.numel * 4 for i in weights)
    assert total < 0.1 * dense  # 5% density: ~5.4 bits per weight instead of 32
    assert path.stat().st_size < 0.2 * dense
    assert [(i.name, i.nbytes) for i in inspect_sparse(path)] == [(i.name, i.nbytes) for i in infos]


def test_every_format_and_dtype_in_one_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8):
        x = (torch.randn(30, 20, generator=gen) * 4).to(dtype)
        x[torch.rand(30, 20, generator=gen) < 0.8] = 0
        for fmt in FORMATS:
            state[f"{fmt}.{dtype}".replace("torch.", "")] = x.clone()
    state["scalar"] = torch.tensor(3.0)
    state["empty"] = torch.zeros(0, 4)
    state["count"] = torch.tensor(7, dtype=torch.int64)
    state["flags"] = torch.rand(9, generator=gen) < 0.5
    state["negzero"] = torch.tensor([0.0, -0.0, float("nan")])
    formats = {name: name.split(".")[0] for name in state if name.split(".")[0] in FORMATS}
    path = tmp_path / "all.sparse"
    infos = save_sparse(state, path, format=formats, compress_values=True, metadata={"a": 1})
    assert {i.name: i.format for i in infos if i.name in formats} == formats
    assert same_state(load_sparse(path), state)
    assert read_raw(path)[1]["metadata"] == {"a": 1}


def test_value_compression_helps_on_trained_like_weights(tmp_path):
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(300, 784, generator=gen) * 0.05  # the scale of trained weights
    weights[torch.rand(300, 784, generator=gen) < 0.9] = 0
    plain = save_sparse({"w": weights}, tmp_path / "a.sparse")[0]
    packed = save_sparse({"w": weights}, tmp_path / "b.sparse", compress_values=True)[0]
    assert packed.codec == "zstd-planes"
    assert packed.value_nbytes < 0.92 * plain.value_nbytes
    assert torch.equal(load_sparse(tmp_path / "b.sparse")["w"], weights)


def test_map_location_and_errors_on_input(tmp_path):
    save_path = tmp_path / "x.sparse"
    save_sparse({"w": torch.ones(3)}, save_path)
    assert load_sparse(save_path, map_location="meta")["w"].device.type == "meta"
    with pytest.raises(TypeError, match="not a tensor"):
        save_sparse({"w": [1, 2]}, tmp_path / "y.sparse")
    with pytest.raises(ValueError, match="unknown format"):
        save_sparse({"w": torch.ones(3)}, tmp_path / "y.sparse", format="zip")
    with pytest.raises(FileNotFoundError):
        load_sparse(tmp_path / "missing.sparse")
    assert not (tmp_path / "y.sparse").exists()


# -- hostile files -----------------------------------------------------------------------------
def test_truncated_files_are_errors(lenet300_file, tmp_path):
    _, path = lenet300_file
    data = path.read_bytes()
    cut = tmp_path / "cut.sparse"
    offsets = sorted({0, 1, 7, 8, 9, 100, len(data) - 1} | set(range(0, len(data), 9973)))
    for offset in offsets:
        cut.write_bytes(data[:offset])
        with pytest.raises(SparseFileError):
            load_sparse(cut)


@FUZZ
@given(data=st.data())
def test_random_byte_flips_are_errors_or_harmless(lenet300_file, tmp_path_factory, data):
    model, path = lenet300_file
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
    bad = tmp_path_factory.mktemp("flip") / "bad.sparse"
    bad.write_bytes(bytes(raw))
    try:
        state = load_sparse(bad)
    except SparseFileError:
        return
    assert same_state(state, model.state_dict())  # e.g. a flip in the header's padding


@FUZZ
@given(data=st.data())
def test_corrupted_streams_reach_the_decoders_and_fail_cleanly(tmp_path_factory, data):
    """Streams corrupted and re-signed: the decoders must refuse them, or the checksum must."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 50, generator=gen)
    x[torch.rand(40, 50, generator=gen) < data.draw(st.sampled_from([0.05, 0.6, 0.97]))] = 0
    fmt = data.draw(st.sampled_from(list(FORMATS)))
    folder = tmp_path_factory.mktemp("streams")
    save_sparse(
        {"w": x}, folder / "ok.sparse", format=fmt, compress_values=data.draw(st.booleans())
    )
    arrays, header = read_raw(folder / "ok.sparse")
    key = data.draw(st.sampled_from(sorted(arrays)))
    stream = arrays[key].copy()
    if data.draw(st.booleans()):
        stream[data.draw(st.integers(0, stream.size - 1))] ^= data.draw(st.integers(1, 255))
    else:
        stream = stream[: data.draw(st.integers(0, stream.size - 1))]
        header["entries"]["w"]["streams"][key.split("#")[1]] = int(stream.size)
    arrays[key] = stream
    if stream.size == 0:
        del arrays[key]
    write_raw(folder / "bad.sparse", arrays, header)
    try:
        state = load_sparse(folder / "bad.sparse")
    except SparseFileError:
        return
    assert torch.equal(state["w"], x)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@FUZZ
@given(data=st.data())
def test_hostile_metadata_is_an_error(lenet300_file, tmp_path_factory, data):
    _, path = lenet300_file
    arrays, header = read_raw(path)
    name = data.draw(st.sampled_from(header["order"]))
    entry = header["entries"][name]
    field = data.draw(st.sampled_from(["format", "shape", "dtype", "nnz", "params", "codec"]))
    if field == "params":
        key = data.draw(st.sampled_from(sorted(entry["params"]) + ["width"]))
        entry["params"][key] = data.draw(JSON)
    elif field == "shape" and data.draw(st.booleans()):
        entry["shape"] = data.draw(st.lists(st.integers(-5, 2**62), max_size=6))
    else:
        entry[field] = data.draw(JSON)
    bad = tmp_path_factory.mktemp("meta") / "bad.sparse"
    write_raw(bad, arrays, header)
    try:
        state = load_sparse(bad)
    except SparseFileError:
        return
    assert same_state(state, load_sparse(path))  # the change was a no-op (e.g. same value)


def test_checksum_format_shape_and_count_errors(lenet300_file, tmp_path):
    _, path = lenet300_file
    name = read_raw(path)[1]["order"][0]
    bad = tmp_path / "bad.sparse"

    def expect(change, match, sign=True, **load):
        arrays, header = read_raw(path)
        change(arrays, header, header["entries"][name])
        write_raw(bad, arrays, header, sign)
        with pytest.raises(SparseFileError, match=match):
            load_sparse(bad, **load)

    def wrong_checksum(arrays, header, entry):
        entry["decoded_sha256"] = "0" * 64

    def wrong_stream(arrays, header, entry):
        key = next(k for k in arrays if k.startswith(name + "#"))
        arrays[key] = arrays[key].copy()
        arrays[key][0] ^= 1

    def reshaped(arrays, header, entry):
        entry["shape"] = entry["shape"][::-1]

    expect(wrong_checksum, "checksum mismatch of the decoded tensor")
    expect(wrong_stream, f"checksum mismatch for '{name}'", sign=False)
    expect(reshaped, "header checksum mismatch", sign=False)  # a shape edited in the header
    expect(lambda a, h, e: e.update(format="zip"), "unknown format 'zip'")
    expect(lambda a, h, e: e.update(dtype="complex64"), "unknown dtype")
    expect(lambda a, h, e: e.update(codec="lzma"), "unknown value codec")
    expect(lambda a, h, e: e.update(shape=[2**30, 2**30]), "max_tensor_bytes")
    expect(lambda a, h, e: e.update(shape=[-1, 3]), "invalid shape")
    expect(lambda a, h, e: e.update(nnz=10**12), "non-zero count")
    expect(lambda a, h, e: e.update(nnz=-1), "non-zero count")
    expect(lambda a, h, e: h.update(version=99), "newer than this winnow")
    expect(lambda a, h, e: h.update(format="other"), "not a winnow sparse checkpoint")
    expect(lambda a, h, e: h.update(order=h["order"][::-1]), "header checksum", sign=False)
    expect(lambda a, h, e: a.pop(next(iter(a))), "do not match the metadata")
    expect(lambda a, h, e: None, "max_tensor_bytes", max_tensor_bytes=100)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(plain))
    with pytest.raises(SparseFileError, match="not a winnow sparse checkpoint"):
        load_sparse(plain)


def test_absurd_shapes_allocate_nothing(lenet300_file, tmp_path):
    _, path = lenet300_file
    arrays, header = read_raw(path)
    for entry in header["entries"].values():
        entry["shape"] = [2**30, 2**30]  # 2**60 elements
        entry["nnz"] = 2**40
    bad = tmp_path / "huge.sparse"
    write_raw(bad, arrays, header)
    tracemalloc.start()
    try:
        # with no bound on the size, the streams' sizes refuse the count before any allocation
        with pytest.raises(SparseFileError, match="value bytes, expected"):
            load_sparse(bad, max_tensor_bytes=2**62, max_total_bytes=2**66)
        with pytest.raises(SparseFileError, match="max_tensor_bytes"):
            load_sparse(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_never_unpickles(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    path = tmp_path / "pickle.sparse"
    torch.save({"w": Boom()}, path)  # a pickle that would run code if unpickled
    with pytest.raises(SparseFileError, match="not a winnow sparse checkpoint"):
        load_sparse(path)


# -- CLI ---------------------------------------------------------------------------------------
def test_cli_pack_inspect_unpack(tmp_path, capsys):
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    model = pruned("lenet300", 0.1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    source = tmp_path / "weights.safetensors"
    save_torch(state, str(source))
    packed = tmp_path / "model.sparse"
    assert main(["pack", str(source), "--out", str(packed), "--compress-values"]) == 0
    out = capsys.readouterr().out
    assert "entropy" in out and "x bound" in out and "written to" in out
    assert main(["inspect", str(packed)]) == 0
    out = capsys.readouterr().out
    assert "layers.0.weight" in out or "weight" in out
    assert "bits" in out and "total" in out
    assert main(["inspect", str(source), "--format", "csr"]) == 0
    assert "would write" in capsys.readouterr().out
    back = tmp_path / "back.safetensors"
    assert main(["unpack", str(packed), "--out", str(back)]) == 0
    unpacked = load_torch(str(back))  # safetensors files keep no order
    assert same_state({k: unpacked[k] for k in state}, state)


def test_cli_pack_a_run_directory_with_masks(tmp_path, capsys):
    from safetensors.torch import save_file as save_torch

    model = models.create("lenet300", num_classes=10, in_channels=1, input_size=28)
    run = tmp_path / "run"
    run.mkdir()
    save_torch(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "final.safetensors")
    )
    masks = Masks.ones(model)
    gen = torch.Generator().manual_seed(0)
    masks = Masks({n: torch.rand(m.shape, generator=gen) < 0.2 for n, m in masks.items()})
    masks.save(tmp_path / "masks.safetensors")
    out = tmp_path / "run.sparse"
    code = main(
        ["pack", str(run), "--masks", str(tmp_path / "masks.safetensors"), "--out", str(out)]
    )
    assert code == 0
    state = load_sparse(out)
    masks.apply(model)
    expected = model.state_dict()
    assert same_state({k: state[k] for k in expected}, expected)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["pack", str(empty), "--out", str(out)]) == 2
    assert "final.safetensors" in capsys.readouterr().err


def test_cli_bad_input_exits_2(tmp_path, capsys):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a safetensors file at all")
    assert main(["pack", str(garbage), "--out", str(tmp_path / "o.sparse")]) == 2
    assert main(["unpack", str(garbage), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert main(["inspect", str(tmp_path / "missing.sparse")]) == 2
    err = capsys.readouterr().err
    assert err.count("winnow: error:") == 3 and "Traceback" not in err
    save_sparse({"w": torch.ones(10)}, tmp_path / "ok.sparse")
    data = bytearray((tmp_path / "ok.sparse").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "bad.sparse").write_bytes(bytes(data))
    assert main(["unpack", str(tmp_path / "bad.sparse"), "--out", str(tmp_path / "o")]) == 2
    assert "checksum" in capsys.readouterr().err
