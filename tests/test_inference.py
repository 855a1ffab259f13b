"""Sparse inference: every kernel equals the dense product of the masked weight; the tuner
keeps a layer dense when nothing beats it; accelerated models save and load with their
choices; Hugging Face GPT-2 (Conv1D) and 1×1 convolutions are accelerated."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import winnow
from winnow.core.nm import nm_select
from winnow.inference import (
    SparseLinear,
    accelerate,
    choices,
    load_accelerated,
    save_accelerated,
    table,
)

OWN = [f"{f}-{p}" for f in ("csr", "chunk") for p in ("serial", "parallel")]
ALL = ["dense", "torch-csr", "torch-bsr4", *OWN]


def pruned_weight(out, inputs, density, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inputs, generator=g)
    keep = torch.rand(out, inputs, generator=g) < density
    if out > 2 and inputs > 2:
        keep[1] = False  # an empty row
        keep[:, 2] = False  # an empty column
    return (w * keep).to(dtype)


def close(actual, expected):
    scale = 1.0 + float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("kernel", ALL)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(24, 40), (7, 300), (64, 520)])
@pytest.mark.parametrize("batch", [1, 5, 17, 35])  # 17, 35: tiles of 16, a rest of 1 and of 3
def test_every_kernel_equals_dense(kernel, density, shape, batch):
    weight = pruned_weight(*shape, density)
    bias = torch.randn(shape[0])
    x = torch.randn(batch, shape[1])
    try:
        layer = SparseLinear.from_weight(weight, bias, kernel)
    except (RuntimeError, ValueError) as err:
        assert kernel.startswith("torch-bsr"), err  # BSR needs the block to divide the shape
        return
    with torch.no_grad():
        close(layer(x), F.linear(x, weight, bias))
    assert torch.equal(layer.dense_weight(), weight)


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("parallel", ["serial", "parallel"])
@pytest.mark.parametrize("batch", [1, 3, 24])
def test_nm_kernel_equals_dense(pattern, parallel, batch):
    n, m = pattern
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(48, 64, generator=g)
    keep = nm_select(dense.abs(), f"{n}:{m}", 1)
    keep[3] = False  # groups with fewer than n kept
    weight = dense * keep
    x = torch.randn(batch, 64)
    layer = SparseLinear.from_weight(weight, None, f"nm-{parallel}", pattern)
    with torch.no_grad():
        close(layer(x), F.linear(x, weight))
    assert torch.equal(layer.dense_weight(), weight)
    with pytest.raises(ValueError, match="more than"):
        SparseLinear.from_weight(dense, None, f"nm-{parallel}", pattern)


@pytest.mark.parametrize("kernel", OWN)
def test_noncontiguous_sequence_and_bf16_inputs(kernel):
    weight = pruned_weight(32, 48, 0.2)
    layer = SparseLinear.from_weight(weight, torch.zeros(32), kernel)
    x = torch.randn(4, 48, 6).transpose(1, 2)  # (4, 6, 48), not contiguous
    with torch.no_grad():
        close(layer(x), F.linear(x, weight))
        y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (4, 6, 32)
    expected = F.linear(x.to(torch.bfloat16).float(), weight).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)


def test_unknown_kernel_and_gradient_are_errors():
    with pytest.raises(ValueError, match="unknown kernel"):
        SparseLinear.from_weight(torch.zeros(2, 2), None, "magic")
    layer = SparseLinear.from_weight(pruned_weight(4, 4, 0.5), None, "csr-serial")
    with pytest.raises(RuntimeError, match="inference"):
        layer(torch.randn(1, 4, requires_grad=True))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10)
    )


def test_accelerate_matches_the_masked_model_and_round_trips(tmp_path):
    model = mlp()
    masks = winnow.prune_at_init(model, "magnitude", 0.1, scope="layer")
    x = torch.randn(3, 64)
    fast = accelerate(model, x, masks=masks, budget=0.02, kernels=["csr-serial", "chunk-serial"])
    reference = masks.apply(mlp())
    with torch.no_grad():
        close(fast(x), reference(x))
    made = choices(fast)
    assert set(made) == {"0", "2", "4"} and all(c.batch == 3 for c in made.values())
    assert "kernel" in table(fast)
    path = tmp_path / "fast.sparse"
    save_accelerated(fast, path)
    again = load_accelerated(mlp(), path)
    assert {k: c.kernel for k, c in choices(again).items()} == {
        k: c.kernel for k, c in made.items()
    }
    with torch.no_grad():
        assert torch.equal(again(x), fast(x))
    assert torch.equal(winnow.load_sparse(path)["0.weight"], reference[0].weight.detach())


def test_the_tuner_keeps_dense_when_no_kernel_is_faster():
    model = mlp()
    masks = winnow.prune_at_init(model, "magnitude", 0.1, scope="layer")
    fast = accelerate(model, torch.randn(1, 64), masks=masks, budget=0.02, margin=1e-9)
    assert all(c.kernel == "dense" for c in choices(fast).values())
    assert all(isinstance(m, nn.Linear) for m in fast if not isinstance(m, nn.ReLU))


def test_pointwise_convolution_and_gpt2_conv1d(tmp_path):
    transformers = pytest.importorskip("transformers")
    conv = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 8, 3))
    with torch.no_grad():
        conv[0].weight.mul_(torch.rand_like(conv[0].weight) < 0.2)
        conv[2].weight.mul_(torch.rand_like(conv[2].weight) < 0.2)
    x = torch.randn(2, 16, 6, 6)
    fast = accelerate(conv, x, budget=0.02, kernels=["csr-serial"], margin=float("inf"))
    assert set(choices(fast)) == {"0"}  # the 3x3 convolution stays as it is
    with torch.no_grad():
        close(fast(x), conv(x))
    save_accelerated(fast, tmp_path / "conv.sparse")
    again = load_accelerated(conv, tmp_path / "conv.sparse")  # strict: the original keys
    with torch.no_grad():
        assert torch.equal(again(x), fast(x))

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (1, 12))
    result = winnow.oneshot(gpt, "magnitude", ids, density=0.3)
    fast = accelerate(result.model, ids, budget=0.02, kernels=["csr-serial"], margin=float("inf"))
    assert any(c.kernel == "csr-serial" for c in choices(fast).values())
    with torch.no_grad():
        close(fast(ids).logits, result.model(ids).logits)
    save_accelerated(fast, tmp_path / "gpt.sparse")
    again = load_accelerated(gpt, tmp_path / "gpt.sparse")  # Conv1D weights back as (in, out)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, fast(ids).logits)


def test_command_line_accelerates_a_zoo_model_and_an_hf_directory(tmp_path, capsys):
    from winnow.cli import main

    data = winnow.data.load("digits", limit=50)
    model = winnow.models.create_for("lenet300", data, seed=0)
    masks = winnow.prune_at_init(model, "magnitude", 0.05)
    weights = tmp_path / "pruned.sparse"
    winnow.save_sparse(masks.apply(model), weights)
    out = tmp_path / "fast.sparse"
    args = ["accelerate", str(weights), "--arch", "lenet300", "--data", "digits", "--batch", "2",
            "--budget", "0.02", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "chosen us" in printed and "all layers" in printed
    again = load_accelerated(winnow.models.create_for("lenet300", data), out)
    x = data.x_test[:2]
    with torch.no_grad():
        close(again(x), masks.apply(model)(x))
    assert main(["accelerate", str(tmp_path), "--out", str(out)]) != 0  # not an HF directory
    assert "not a Hugging Face model directory" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_semi_structured_2_4_on_cuda():
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        pytest.skip("semi-structured sparsity needs compute capability 8.0 or above")
    dense = torch.randn(128, 256, device="cuda", dtype=torch.float16)
    weight = dense * nm_select(dense.abs().float(), "2:4", 1)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    layer = SparseLinear.from_weight(weight, None, "cuda-2:4", (2, 4))
    torch.testing.assert_close(layer(x), F.linear(x, weight), rtol=1e-2, atol=1e-2)
    model = nn.Sequential(nn.Linear(256, 128, bias=False)).to("cuda", torch.float16)
    with torch.no_grad():
        model[0].weight.copy_(weight)
    fast = accelerate(model, x, budget=0.05, kernels=["cuda-2:4"], margin=float("inf"))
    assert choices(fast)["0"].kernel == "cuda-2:4"


def test_generated_kernels_go_to_a_writable_cache_directory(tmp_path, monkeypatch):
    import tempfile

    import numba

    from winnow.inference import tiled

    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "numba"))
    assert tiled._directory() == tmp_path / "numba" / "winnow-kernels"
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # its winnow-kernels cannot be made
    assert str(tiled._directory()).startswith(tempfile.gettempdir())
