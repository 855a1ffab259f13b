"""Bring your own model (issue 15): the matrix of models x data forms x operations.

Models: a torchvision-style ResNet (BatchNorm, residual adds, adaptive pooling), a
``nn.TransformerEncoder`` classifier on token ids, LSTM and GRU classifiers, a grouped and
depthwise convolution network with a ``torch.cat``, and Hugging Face
``BertForSequenceClassification`` and ``GPT2LMHeadModel`` built from tiny configs (no
download). Data: a DataLoader, a list of batches (tuples, or dicts as Hugging Face collators
return), a pair ``(x, y)`` and a DataSplits. Operations: scoring with every at-init criterion,
``prune_at_init``, training with enforced masks, gradual pruning, a sparse save of a compiled
model loaded strictly into a fresh instance of the plain class, FLOPs.
"""

import importlib.util

import pytest
import torch
from byom_models import CASES, FORMS, LENGTH

import winnow
from winnow import TrainConfig, prunable_parameters, train
from winnow.schedules import GradualPruner
from winnow.structured import count

CRITERIA = ("random", "magnitude", "snip", "grasp", "synflow")


def case_of(name):
    case = CASES[name]
    if case.needs and importlib.util.find_spec(case.needs) is None:
        pytest.skip(f"needs {case.needs} (pip install 'winnow[hf]')")
    return case


def options_for(case, criterion):
    if criterion == "grasp":  # 8 examples of each class here (32 examples, 4 classes)
        return {"samples": 16} if case.name == "gpt2" else {"samples_per_class": 4}
    if criterion == "snip":
        return {"samples": 16}
    return {}


def assert_masked_zero(model, masks):
    for name, param in prunable_parameters(model).items():
        if name in masks:
            assert bool((param.detach()[~masks[name].to(param.device)] == 0).all()), name


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(CASES))
def test_every_at_init_criterion_scores(name, form):
    case = case_of(name)
    model = case.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = prunable_parameters(model)
    for criterion in CRITERIA:
        scores = winnow.score(model, criterion, case.data(form), **options_for(case, criterion))
        assert set(scores) == set(params), criterion
        for key, value in scores.items():
            assert value.shape == params[key].shape and bool(torch.isfinite(value).all()), (
                criterion,
                key,
            )
        if criterion in ("snip", "grasp", "synflow"):  # the scores depend on the weights
            assert any(bool(v.abs().sum() > 0) for v in scores.values()), criterion
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model was changed"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(CASES))
def test_prune_at_init_then_train_with_enforced_masks(name, form):
    case = case_of(name)
    model = case.model()
    data = case.data(form)
    masks = winnow.prune_at_init(model, "snip", 0.2, data, samples=16)
    params = prunable_parameters(model)
    assert set(masks) == set(params)
    assert masks.density() == pytest.approx(0.2, abs=1e-3)
    config = TrainConfig(iterations=4, batch_size=8, eval_every=2, lr=1e-3)
    result = train(model, data, config, masks=masks)
    assert len(result.history) == 2 and result.iterations == 4
    assert all(r["train_loss"] == r["train_loss"] for r in result.history)  # no NaN
    assert_masked_zero(model, masks)
    moved = [n for n, p in params.items() if bool((p.detach()[masks[n]] != 0).any())]
    assert moved, "nothing trained"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(CASES))
def test_gradual_pruning_while_training(name, form):
    case = case_of(name)
    model = case.model()
    pruner = GradualPruner(0.75, begin=0, end=4, frequency=2)
    config = TrainConfig(iterations=6, batch_size=8, eval_every=3)
    result = train(model, case.data(form), config, pruner=pruner)
    assert result.masks is not None
    assert result.masks.density() == pytest.approx(0.25, abs=1e-3)
    assert_masked_zero(model, result.masks)


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_save_loads_strictly_into_the_plain_class(name, tmp_path):
    case = case_of(name)
    model = case.model()
    masks = winnow.prune_at_init(model, "magnitude", 0.3)
    masks.apply(model)
    winnow.save_sparse(torch.compile(model, backend="eager"), tmp_path / "m.sparse")
    fresh = case.model(seed=1)
    fresh.load_state_dict(winnow.load_sparse(tmp_path / "m.sparse"), strict=True)
    model.eval()
    fresh.eval()
    x = case.x[:4]
    with torch.no_grad():
        ours, theirs = model(x), fresh(x)
    ours = getattr(ours, "logits", ours)
    theirs = getattr(theirs, "logits", theirs)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", list(CASES))
def test_flops_count_every_weight_matrix(name):
    """Every weight matrix but the embedding tables takes part in at least one multiply per
    input position, so the MACs are at least their size (times the length for sequence
    models); nothing a rule covers is left uncounted."""
    case = case_of(name)
    model = case.model()
    counts = count(model, case.input_shape)
    matrices = {
        n: p
        for n, p in prunable_parameters(model).items()
        if "embed" not in n and not n.endswith(("wte.weight", "word_embeddings.weight"))
    }
    positions = LENGTH if case.input_shape == (LENGTH,) else 1
    floor = sum(p.numel() for p in matrices.values())
    assert counts.flops >= floor, (counts.flops, floor, counts.uncounted)
    if positions > 1 and name not in ("bert",):  # BERT's pooler and head see one position
        assert counts.flops >= floor * positions * 0.5, (counts.flops, floor * positions)


@pytest.mark.parametrize("name", ["resnet", "grouped-cat"])
def test_channel_surgery_or_the_reason_it_is_refused(name):
    """Channel pruning of the CNNs: every prunable group shrinks to a smaller network that
    computes what the masked one does; a group that cannot (the stem read by the grouped and
    depthwise convolutions of the concatenation) is refused with its reason."""
    from winnow.structured import apply_channel_masks, find_groups, shrink

    case = case_of(name)
    model = case.model().eval()
    groups = find_groups(model, case.input_shape)
    keep = {g.name: torch.arange(g.size) % 2 == 0 for g in groups if g.prunable and not g.tied}
    assert keep
    small, _ = shrink(model, keep, case.input_shape)
    masked = apply_channel_masks(model, keep, case.input_shape).eval()
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(case.x[:4]), masked(case.x[:4]))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    for group in groups:
        if not group.prunable:
            assert group.reason, group.name
            with pytest.raises(ValueError, match="grouped convolution|output"):
                shrink(model, {group.name: torch.arange(group.size) % 2 == 0}, case.input_shape)
