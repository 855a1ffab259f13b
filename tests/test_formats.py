"""winnow.formats: bit packing, every encoding's round trip and exact size, entropy vs the bound."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from winnow.formats import (
    FORMATS,
    SparseFileError,
    SparseView,
    bits,
    choose_format,
    decode,
    encode,
    format_sizes,
    golomb,
    index_bits_per_nonzero,
    log2_binomial,
)
from winnow.formats.codec import decode_positions
from winnow.formats.encodings import get_format

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8)
SHAPES = ((), (0,), (1,), (37,), (13, 17), (2, 3, 4, 5), (5, 0))


def sparse_tensor(shape, density, dtype=torch.float32, seed=0):
    """Gaussian values at random positions; ``density`` None: exactly one non-zero."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=gen) * 3
    if dtype in (torch.int8, torch.int64):
        values = values.round().clamp(-128, 127)
        values[values == 0] = 1
    if density is None:
        keep = torch.zeros(shape, dtype=torch.bool).reshape(-1)
        if keep.numel():
            keep[keep.numel() // 2] = True
        keep = keep.reshape(shape)
    else:
        keep = torch.rand(shape, generator=gen) < density
    return torch.where(keep, values, torch.zeros(())).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# -- bits ------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", range(1, 65))
def test_pack_uint_round_trip_every_width(width):
    rng = np.random.default_rng(width)
    top = (1 << width) - 1
    for count in (0, 1, 7, 8, 9, 1001):
        values = rng.integers(0, min(top, 2**62), size=count, dtype=np.uint64, endpoint=True)
        if count:
            values[0] = top
        packed = bits.pack_uint(values, width)
        assert packed.dtype == np.uint8 and packed.size == math.ceil(count * width / 8)
        assert np.array_equal(bits.unpack_uint(packed, width, count), values)


def test_pack_uint_layout_is_msb_first_and_checks_fit():
    assert bits.pack_uint(np.array([1, 2, 3]), 2).tolist() == [0b01101100]
    assert bits.pack_uint(np.array([0xABC]), 12).tolist() == [0xAB, 0xC0]
    with pytest.raises(ValueError, match="does not fit"):
        bits.pack_uint(np.array([8]), 3)
    with pytest.raises(ValueError, match="negative"):
        bits.pack_uint(np.array([-1]), 3)
    assert bits.bit_width(0) == 0 and bits.bit_width(1) == 1 and bits.bit_width(255) == 8


def test_unpack_rejects_wrong_length_and_dirty_padding():
    packed = bits.pack_uint(np.array([5, 6, 7]), 3)  # 9 bits -> 2 bytes
    with pytest.raises(SparseFileError, match="expected 2"):
        bits.unpack_uint(packed[:1], 3, 3)
    with pytest.raises(SparseFileError, match="expected 2"):
        bits.unpack_uint(np.append(packed, 0), 3, 3)
    dirty = packed.copy()
    dirty[-1] |= 1
    with pytest.raises(SparseFileError, match="padding"):
        bits.unpack_uint(dirty, 3, 3)


def test_varwidth_and_unary_round_trip():
    rng = np.random.default_rng(0)
    widths = rng.integers(0, 65, size=500)
    values = np.array(
        [int(rng.integers(0, 2**62)) % (1 << int(w)) if w else 0 for w in widths], np.uint64
    )
    packed = bits.pack_varwidth(values, widths)
    assert packed.size == math.ceil(widths.sum() / 8)
    assert np.array_equal(bits.unpack_varwidth(packed, widths), values)
    q = rng.geometric(0.3, size=300) - 1
    stream = bits.pack_unary(q)
    assert stream.size == math.ceil(bits.unary_nbits(q) / 8)
    assert np.array_equal(bits.unpack_unary(stream, q.size), q)
    with pytest.raises(SparseFileError, match="expected 299"):
        bits.unpack_unary(stream, q.size - 1)


@pytest.mark.parametrize("parameter", [1, 2, 3, 5, 8, 13, 64, 1000])
def test_golomb_round_trip_and_exact_size(parameter):
    values = np.random.default_rng(parameter).geometric(0.05, size=777).astype(np.uint64) - 1
    streams = golomb.golomb_encode(values, parameter)
    nbits = golomb.golomb_nbits(values, parameter)
    assert [s.size for s in streams.values()] == [math.ceil(b / 8) for b in nbits]
    assert np.array_equal(golomb.golomb_decode(streams, parameter, values.size), values)


# -- every format ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip_is_bitwise_exact(fmt):
    for dtype in (*DTYPES, torch.int64, torch.bool):
        for shape in SHAPES:
            for density in (0.0, None, 0.3, 1.0):
                if dtype == torch.bool:
                    tensor = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < (
                        density or 0.5
                    )
                else:
                    tensor = sparse_tensor(shape, density, dtype)
                encoded = encode(tensor, fmt)
                back = decode(encoded)
                assert same_bits(back, tensor), (fmt, dtype, shape, density)
                assert encoded.nbytes == get_format(fmt).nbytes(SparseView.of(tensor))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_special_values_survive(fmt):
    tensor = torch.tensor(
        [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 0.0, 3.5, 0.0]
    )
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = tensor.to(dtype)
        back = decode(encode(x, fmt))
        assert same_bits(back, x)  # -0.0 is a non-zero bit pattern: kept as a value
    assert SparseView.of(tensor).m == 6


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_size_model_equals_encoded_size_per_stream(fmt):
    for shape, density, seed in [
        ((300, 784), 0.05, 0),
        ((100, 300), 0.5, 1),
        ((16, 6, 5, 5), 0.9, 2),
        ((20000,), 0.002, 3),
        ((64, 65), 0.38, 4),
    ]:
        view = SparseView.of(sparse_tensor(shape, density, seed=seed))
        encoded = encode(view, fmt)
        model_bits = get_format(fmt).stream_bits(view)
        assert set(model_bits) == set(encoded.streams)
        for name, stream in encoded.streams.items():
            assert stream.size == math.ceil(model_bits[name] / 8), (fmt, name)
        assert format_sizes(view)[fmt] == encoded.nbytes


def test_sizes_follow_the_design_formulas():
    rows, cols = 300, 784
    view = SparseView.of(sparse_tensor((rows, cols), 0.1))
    n, m = view.n, view.m
    gaps = np.diff(view.positions, prepend=-1) - 1
    w = math.ceil
    assert FORMATS["bitmap"].stream_bits(view) == {"bitmap": n}
    assert FORMATS["coo"].stream_bits(view) == {"index": m * w(math.log2(n))}
    assert FORMATS["delta"].stream_bits(view) == {"runs": m * w(math.log2(gaps.max() + 1))}
    assert FORMATS["csr"].stream_bits(view) == {
        "indices": m * w(math.log2(cols)),
        "indptr": (rows + 1) * w(math.log2(m + 1)),
    }
    assert FORMATS["csc"].stream_bits(view) == {
        "indices": m * w(math.log2(rows)),
        "indptr": (cols + 1) * w(math.log2(m + 1)),
    }
    for b in (1, 3, 4, 8):
        padding = int((gaps // (2**b - 1)).sum())
        assert FORMATS["padded-delta"].stream_bits(view, width=b) == {"entries": (m + padding) * b}
        back = decode(encode(view, "padded-delta", width=b))
        assert np.array_equal(np.flatnonzero(back.reshape(-1).numpy()), view.positions)
    best = FORMATS["padded-delta"].stream_bits(view)["entries"]
    assert best == min(
        FORMATS["padded-delta"].stream_bits(view, width=b)["entries"] for b in range(1, 20)
    )


def test_csc_stores_values_in_column_order():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    encoded = encode(x, "csc")
    assert encoded.values.view(np.float32).tolist() == [2.0, 1.0, 3.0]
    assert torch.equal(decode(encoded), x)


DENSITIES = (0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.3, 0.35, 0.38, 0.4, 0.45, 0.5, 0.55, 0.62)
DENSITIES += (0.7, 0.8, 0.9, 0.95, 0.99)


@pytest.mark.parametrize("n", [200_000, 1_000_000])
def test_entropy_format_is_within_two_percent_of_the_bound(n):
    """Bound tested: index bits <= 1.02 * log2 C(n, m) + 64 (measured: at most ~1.013)."""
    rng = np.random.default_rng(n)
    for density in DENSITIES:
        mask = rng.random(n) < density
        tensor = torch.from_numpy(np.where(mask, 1.0, 0.0).astype(np.float32))
        encoded = encode(tensor, "entropy")
        bound = log2_binomial(n, int(mask.sum()))
        assert 8 * encoded.index_nbytes <= 1.02 * bound + 64, (density, encoded.params)
        assert torch.equal(decode(encoded), tensor)


def test_entropy_is_never_beaten_by_much_and_fixed_formats_are():
    """No fixed index format is best everywhere (Hoefler et al. 2021, §2.2)."""
    winners = set()
    for density in (0.002, 0.05, 0.3, 0.9):
        view = SparseView.of(sparse_tensor((500, 400), density, seed=7))
        per_nz = index_bits_per_nonzero(view)
        bound = log2_binomial(view.n, view.m) / view.m
        assert per_nz["entropy"] <= 1.03 * bound + 64 / view.m
        fixed = {k: v for k, v in per_nz.items() if k != "entropy"}
        winners.add(min(fixed, key=fixed.get))
    assert len(winners) >= 2


def test_choose_format_picks_the_real_minimum():
    cases = [((784, 300), 0.002), ((784, 300), 0.05), ((120, 400), 0.5), ((6, 1, 5, 5), 0.9)]
    cases += [((10,), 1.0), ((0, 3), 0.0), ((64,), 0.0)]
    for shape, density in cases:
        tensor = sparse_tensor(shape, density, seed=3)
        actual = {name: encode(tensor, name).nbytes for name in FORMATS}
        chosen = choose_format(tensor)
        assert actual[chosen] == min(actual.values()), (shape, density, actual)
        assert encode(tensor, "auto").format == chosen
    dense = sparse_tensor((50, 50), 1.0)
    assert choose_format(dense) == "dense"


def test_choose_format_from_counts_uses_count_only_formats():
    tensor = sparse_tensor((300, 784), 0.01)
    view = SparseView.of(tensor)
    counts = (tensor.shape, view.m, tensor.dtype)
    sizes = format_sizes(counts)
    assert set(sizes) == {"dense", "bitmap", "coo", "csr", "csc"}
    assert all(sizes[k] == format_sizes(view)[k] for k in sizes)
    assert choose_format(counts) == min(sizes, key=sizes.get)
    with pytest.raises(ValueError, match="depends on the positions"):
        format_sizes(counts, ["entropy"])
    with pytest.raises(ValueError, match="do not fit"):
        choose_format(((3, 3), 10, torch.float32))


def test_unknown_format_and_dtype_are_errors():
    with pytest.raises(ValueError, match="unknown format 'zip'"):
        encode(torch.zeros(3), "zip")
    with pytest.raises(ValueError, match="not supported"):
        encode(torch.zeros(3, dtype=torch.complex64), "coo")
    with pytest.raises(ValueError, match="takes no option"):
        encode(torch.zeros(3), "coo", width=3)
    with pytest.raises(SparseFileError, match="unknown format"):
        decode_positions("zip", {}, {}, (3,), 0)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "dense"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decoders_reject_corrupted_streams(fmt, data):
    """Any corruption of a stream is an error or a valid index; never a crash or a hang."""
    density = data.draw(st.sampled_from([0.02, 0.4, 0.8]))
    view = SparseView.of(sparse_tensor((23, 41), density, seed=data.draw(st.integers(0, 3))))
    encoded = encode(view, fmt)
    streams = {k: v.copy() for k, v in encoded.streams.items()}
    name = data.draw(st.sampled_from(sorted(streams)))
    stream = streams[name]
    action = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if action == "flip" and stream.size:
        at = data.draw(st.integers(0, stream.size - 1))
        stream[at] ^= data.draw(st.integers(1, 255))
    elif action == "truncate" and stream.size:
        stream = stream[: data.draw(st.integers(0, stream.size - 1))]
    else:
        stream = np.append(stream, np.uint8(data.draw(st.integers(0, 255))))
    streams[name] = stream
    try:
        positions = decode_positions(fmt, streams, encoded.params, view.shape, view.m)
    except SparseFileError:
        return
    assert positions.size == view.m
    assert positions.min() >= 0 and positions.max() < view.n
    assert np.unique(positions).size == view.m
