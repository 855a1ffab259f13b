"""Files written by winnow 0.1 (tests/fixtures/v0.1, written at commit 3e8b18c) still load.

Mask files, sparse checkpoints, store tensor files, structured (spec + state) files and a run
store with at-init and lottery runs; each is compared with what the same calls compute today.
"""

import shutil
from pathlib import Path

import pytest
import torch

import winnow
from winnow import models, structured

V01 = Path(__file__).parent / "fixtures" / "v0.1"


def _masked_model():
    model = models.create("mlp", input_size=8, num_classes=4, hidden=[32, 16], seed=0)
    masks = winnow.prune_at_init(model, "random", 0.3, seed=1)
    return masks, masks.apply(model)


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_mask_file_loads():
    masks, _ = _masked_model()
    assert winnow.Masks.load(V01 / "masks.safetensors") == masks


@pytest.mark.parametrize("name", ["sparse.winnow", "sparse-compressed.winnow"])
def test_sparse_checkpoint_loads(name):
    _, model = _masked_model()
    assert _equal(winnow.load_sparse(V01 / name), dict(model.state_dict()))


def test_store_tensor_file_loads():
    from winnow.experiments import load_tensors, tensor_metadata

    _, model = _masked_model()
    assert _equal(load_tensors(V01 / "tensors.safetensors"), dict(model.state_dict()))
    assert tensor_metadata(V01 / "tensors.safetensors") == {"iteration": 3, "name": "θ"}


def test_structured_file_loads():
    data = winnow.data.load("synthetic", input_shape=(1, 32, 32), limit=8)
    spec = structured.spec_for("vgg11", data, widths=[8, 16, 16, 16, 32, 32, 32, 32])
    dense = structured.rebuild(spec, seed=0)
    masks = structured.uniform_structure(dense, 0.5, (1, 32, 32)).masks
    small, small_spec = winnow.shrink(dense, masks, spec=spec)
    loaded, loaded_spec = structured.load(V01 / "structured.safetensors")
    assert loaded_spec == small_spec
    assert _equal(dict(loaded.state_dict()), dict(small.state_dict()))


@pytest.fixture
def old_results(tmp_path):
    target = tmp_path / "results"
    shutil.copytree(V01 / "results", target)
    return target


def test_run_store_reports_rebuild(old_results):
    from winnow.experiments import RunStore, at_init, lottery

    store = RunStore(old_results)
    assert [r["status"] for r in store.runs("at-init")] == ["done"] * 3
    assert {r["config"]["control"] for r in store.runs("lottery")} == {"none", "reinit"}
    rows = store.records("at-init", kind="result")
    assert len(rows) == 3 and all(0 <= r["test_acc"] <= 1 for r in rows)
    at_init_paths = at_init.report(old_results)
    assert "snip" in at_init_paths["table"].read_text()
    lottery_paths = lottery.report(old_results)
    assert "random reinit" in lottery_paths["table"].read_text()
    ticket = next(r for r in store.runs("lottery") if r["config"]["control"] == "none")
    masks = winnow.Masks.load(old_results / "lottery" / ticket["run_id"] / "masks-1.safetensors")
    assert 0.4 < masks.density() < 0.6
