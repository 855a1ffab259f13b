"""export_onnx: a pruned model to ONNX with the exporter that needs no onnxscript (issue 15)."""

import importlib.util

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import winnow
from winnow import Masks, models, prunable_parameters
from winnow.formats import export_onnx

pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def run(path, feeds):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


def random_masks(model, density=0.2):
    gen = torch.Generator().manual_seed(0)
    return Masks(
        {
            n: torch.rand(p.shape, generator=gen) < density
            for n, p in prunable_parameters(model).items()
        }
    )


def test_pruned_cnn_exports_with_masks_and_a_dynamic_batch(tmp_path):
    model = models.create("lenet5", seed=0)
    masks = random_masks(model)
    path = export_onnx(model, torch.randn(2, 1, 28, 28), tmp_path / "m.onnx", masks=masks)
    x = torch.randn(5, 1, 28, 28)
    plain = masks.apply(models.create("lenet5", seed=0)).eval()
    (got,) = run(path, {"input": x})
    torch.testing.assert_close(torch.from_numpy(got), plain(x), rtol=1e-4, atol=1e-5)
    assert not any(p.grad is not None for p in model.parameters())
    assert all(bool((p != 0).all()) for p in prunable_parameters(model).values())  # unchanged


def test_token_model_compiled_and_torch_pruned_wrappers_export(tmp_path):
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.rnn = nn.GRU(16, 16, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, ids):
            return self.head(self.rnn(self.embed(ids))[0][:, -1])

    model = Tagger()
    torch_prune.l1_unstructured(model.head, "weight", amount=0.5)
    wrapped = torch.compile(model, backend="eager")
    ids = torch.randint(0, 50, (3, 7))
    path = export_onnx(wrapped, ids, tmp_path / "t.onnx")
    (got,) = run(path, {"input": torch.randint(0, 50, (4, 7))})
    assert got.shape == (4, 3)
    assert hasattr(model.head, "weight_orig")  # the caller's reparametrisation is kept


def test_missing_onnx_is_a_clear_import_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"winnow\[onnx\]"):
        export_onnx(nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_hugging_face_dict_inputs_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    batch = {
        "input_ids": torch.randint(0, 100, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    path = export_onnx(model, batch, tmp_path / "bert.onnx", masks=random_masks(model, 0.5))
    outputs = run(path, batch)
    assert outputs[0].shape == (2, 3)


def test_top_level_name():
    assert winnow.formats.export_onnx is export_onnx
