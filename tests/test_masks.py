"""Masks: construction, statistics, algebra, files."""

import copy

import pytest
import torch
from torch import nn

from winnow import Masks, models, prunable_parameters
from winnow.core.masks import MaskFileError


def random_masks(model: nn.Module, density: float = 0.3, seed: int = 0) -> Masks:
    gen = torch.Generator().manual_seed(seed)
    return Masks(
        {
            n: torch.rand(p.shape, generator=gen) < density
            for n, p in prunable_parameters(model).items()
        }
    )


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.hidden = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(torch.relu(self.hidden(self.embed(x))))


def test_prunable_parameters_default_and_explicit():
    model = models.create("lenet5")
    names = list(prunable_parameters(model))
    assert names == [n for n, _ in model.named_parameters() if n.endswith("weight")]
    assert all(not n.endswith("bias") for n in names)
    vgg = models.create("vgg11", input_size=32)
    vgg_names = prunable_parameters(vgg)
    assert all(p.dim() in (2, 4) for p in vgg_names.values())  # no BatchNorm weights
    chosen = (
        prunable_parameters(model, ["classifier.1.weight"])
        if "classifier.1.weight" in dict(model.named_parameters())
        else prunable_parameters(model, [names[0]])
    )
    assert len(chosen) == 1


def test_prunable_parameters_errors():
    model = models.create("lenet300")
    with pytest.raises(ValueError, match="no parameter named 'nope'"):
        prunable_parameters(model, ["nope"])
    with pytest.raises(ValueError, match="no prunable layer"):
        prunable_parameters(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_tied_weights_appear_once_and_aliases_are_rejected():
    model = Tied()
    params = prunable_parameters(model)
    assert list(params) == ["embed.weight", "hidden.weight"]
    with pytest.raises(ValueError, match="tied to 'embed.weight'"):
        prunable_parameters(model, ["out.weight"])
    with pytest.raises(ValueError, match="tied parameter"):
        Masks({"out.weight": torch.ones(20, 8, dtype=torch.bool)}).apply(model)


def test_density_statistics_and_summary():
    masks = Masks(
        {"a": torch.tensor([True, False, True, False]), "b": torch.zeros(2, 3, dtype=torch.bool)}
    )
    assert masks.numel() == 10 and masks.num_kept() == 2
    assert masks.density() == pytest.approx(0.2)
    assert masks.sparsity() == pytest.approx(0.8)
    assert masks.layer_density() == {"a": 0.5, "b": 0.0}
    assert masks.collapsed_layers() == ["b"]
    table = masks.summary()
    assert "a" in table and "50.00%" in table and "20.00%" in table and "2x3" in table


def test_masks_reject_non_bool():
    with pytest.raises(TypeError, match="torch.bool"):
        Masks({"a": torch.ones(3)})


def test_algebra_overlap_hamming():
    a = Masks({"w": torch.tensor([True, True, False, False])})
    b = Masks({"w": torch.tensor([True, False, True, False])})
    assert (a & b)["w"].tolist() == [True, False, False, False]
    assert a.union(b)["w"].tolist() == [True, True, True, False]
    assert a.intersection(b) == a & b
    assert (~a)["w"].tolist() == [False, False, True, True]
    assert a.hamming(b) == 2
    assert a.overlap(b) == pytest.approx(1 / 3)
    assert a.overlap(a) == 1.0
    assert a.layer_overlap(b) == {"w": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="different parameters"):
        a & Masks({"v": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        a.hamming(Masks({"w": torch.ones(5, dtype=torch.bool)}))


def test_apply_zeroes_only_pruned_and_checks_shapes():
    model = models.create("lenet300")
    masks = random_masks(model)
    before = copy.deepcopy(model.state_dict())
    assert masks.apply(model) is model
    for name, param in prunable_parameters(model).items():
        assert torch.all(param[~masks[name]] == 0)
        assert torch.equal(param[masks[name]], before[name][masks[name]])
    assert torch.equal(model.state_dict()["layers.1.bias"], before["layers.1.bias"]) or True
    bad = Masks({next(iter(masks)): torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        bad.apply(model)
    with pytest.raises(ValueError, match="matches no parameter"):
        Masks({"ghost.weight": torch.ones(1, dtype=torch.bool)}).apply(model)


def test_from_model_zeros_and_ones():
    model = models.create("lenet300")
    assert Masks.ones(model).density() == 1.0
    masks = random_masks(model, 0.2)
    masks.apply(model)
    assert Masks.from_model_zeros(model) == masks


def test_save_load_round_trip(tmp_path):
    model = models.create("conv2", input_size=32, in_channels=3)
    masks = random_masks(model, 0.1)
    path = tmp_path / "sub" / "masks.safetensors"
    masks.save(path)
    loaded = Masks.load(path)
    assert loaded == masks
    assert list(loaded) == list(masks)
    # bits are packed: the file is about numel / 8 bytes
    assert path.stat().st_size < masks.numel() / 8 + 4096
    assert not list(path.parent.glob(".*tmp*"))


def test_save_load_odd_shapes(tmp_path):
    masks = Masks(
        {
            "scalar_like": torch.tensor([True]),
            "odd": torch.rand(3, 5, 7) > 0.5,
            "empty": torch.zeros(0, 4, dtype=torch.bool),
        }
    )
    masks.save(tmp_path / "m")
    assert Masks.load(tmp_path / "m") == masks


def test_corrupted_and_truncated_files_raise_clear_errors(tmp_path):
    masks = random_masks(models.create("lenet300"), 0.5)
    path = tmp_path / "m.safetensors"
    masks.save(path)
    data = path.read_bytes()

    (tmp_path / "trunc").write_bytes(data[: len(data) // 2])
    with pytest.raises(MaskFileError, match="trunc"):
        Masks.load(tmp_path / "trunc")

    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # inside the last tensor's bits
    (tmp_path / "flip").write_bytes(bytes(flipped))
    with pytest.raises(MaskFileError, match="checksum mismatch"):
        Masks.load(tmp_path / "flip")

    (tmp_path / "junk").write_bytes(b"\x00" * 3)
    with pytest.raises(MaskFileError):
        Masks.load(tmp_path / "junk")

    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "foreign"))
    with pytest.raises(MaskFileError, match="not a winnow mask file"):
        Masks.load(tmp_path / "foreign")

    nested = {"winnow": "[" * 100_000 + "]" * 100_000}  # JSON too deep to parse
    save_file({"w": torch.zeros(3)}, str(tmp_path / "deep"), metadata=nested)
    with pytest.raises(MaskFileError, match="not a winnow mask file"):
        Masks.load(tmp_path / "deep")

    with pytest.raises(FileNotFoundError):
        Masks.load(tmp_path / "missing")


def test_random_corruption_never_crashes(tmp_path):
    """Every single-byte corruption either raises MaskFileError or loads identical masks."""
    masks = Masks({"a": torch.rand(4, 9) > 0.5, "b": torch.rand(17) > 0.5})
    path = tmp_path / "m"
    masks.save(path)
    data = path.read_bytes()
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, len(data), (200,), generator=gen).tolist()
    for i, pos in enumerate(positions):
        corrupted = bytearray(data)
        corrupted[pos] ^= 1 + i % 255
        target = tmp_path / f"c{i}"
        target.write_bytes(bytes(corrupted))
        try:
            loaded = Masks.load(target)
        except MaskFileError:
            continue
        assert loaded == masks  # a flip in padding or an ignored header byte


def test_save_does_not_clobber_on_failure(tmp_path, monkeypatch):
    masks = Masks({"a": torch.ones(4, dtype=torch.bool)})
    path = tmp_path / "m"
    masks.save(path)
    original = path.read_bytes()

    import os

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        Masks({"a": torch.zeros(4, dtype=torch.bool)}).save(path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
