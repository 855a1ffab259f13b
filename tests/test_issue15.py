"""One test per item of issue 15's failure list (bring your own model, data and loop).

Each was run on winnow 0.2 as the issue describes and failed there; the matrix of models x
data forms x operations is tests/test_byom.py, masks under gradient changes are in
tests/test_enforcement.py, FLOPs in tests/test_flops_any_model.py, ONNX in tests/test_onnx.py.
"""

import importlib.util
import math
import os
import warnings

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from byom_models import CASES, GroupedCat, Recurrent, TokenTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import winnow
from winnow import TrainConfig, prunable_parameters, train
from winnow.core.interop import from_ao, from_torch_prune, to_ao, to_torch_prune
from winnow.core.prunable import Rules, UncoveredWeightsWarning
from winnow.core.scores import NonFiniteError
from winnow.data import DataSplits, crop_flip
from winnow.inputs import DataError
from winnow.training import TrainingDiverged

needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="pip install 'winnow[hf]'"
)


def tokens():
    case = CASES["lstm"]
    return case.x, case.y


# -- 1. weights silently not pruned -------------------------------------------------------------
def test_recurrent_weights_are_pruned_and_the_density_is_the_models():
    model = Recurrent("lstm")
    masks = winnow.prune_at_init(model, "snip", 0.1, tokens(), samples=16)
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1"} <= set(
        masks
    )
    matrices = sum(p.numel() for n, p in model.named_parameters() if "bias" not in n)
    assert masks.numel() == matrices  # every weight matrix (embedding, LSTM, head) is covered
    assert masks.density() == pytest.approx(0.1, abs=1e-3)


def test_attention_in_projections_are_covered():
    names = prunable_parameters(TokenTransformer())
    for layer in (0, 1):
        assert f"encoder.layers.{layer}.self_attn.in_proj_weight" in names
        assert f"encoder.layers.{layer}.self_attn.out_proj.weight" in names
    assert "position_embeddings.weight" not in names  # positions stay dense by default
    assert "position_embeddings.weight" in prunable_parameters(
        TokenTransformer(), rules=Rules(positional=True)
    )


@needs_hf
def test_gpt2_conv1d_layers_are_covered_and_positions_are_not():
    names = set(prunable_parameters(CASES["gpt2"].model()))
    for block in (0, 1):
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert f"transformer.h.{block}.{layer}.weight" in names
    assert "transformer.wpe.weight" not in names and "transformer.wte.weight" in names
    bert = set(prunable_parameters(CASES["bert"].model()))
    assert not any("position_embeddings" in n or "token_type_embeddings" in n for n in bert)


def test_uncovered_weight_matrices_are_reported_and_warned_once():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.interaction = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return self.fc(x) @ self.interaction

    with pytest.warns(UncoveredWeightsWarning, match="interaction"):
        prunable_parameters(Bilinear())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model class
        prunable_parameters(Bilinear())
    report = prunable_parameters(Bilinear(), report=True)
    assert "fc.weight" in report.covered and "interaction" in report.skipped
    assert "interaction" in report.table()


# -- 2. data beyond DataSplits of floats ----------------------------------------------------------
def test_lottery_rounds_and_pruning_from_scratch_take_loaders_and_pairs():
    from winnow.schedules.lottery import iterative_magnitude_pruning

    case = CASES["resnet"]
    loader = DataLoader(TensorDataset(case.x, case.y), batch_size=8)
    config = TrainConfig(iterations=2, batch_size=8)
    rounds = list(iterative_magnitude_pruning(case.model(), loader, config, rounds=1, rate=0.5))
    assert [r.round for r in rounds] == [0, 1]
    assert rounds[1].masks.density() < 1
    found = winnow.prune_from_scratch(
        GroupedCat(), (case.x, case.y), 0.9, iterations=2, batch_size=8
    )
    assert found.structure.flops <= 0.9 * found.structure.dense_flops


def test_token_ids_in_datasplits_and_the_per_class_error_names_the_class():
    x, y = tokens()
    splits = DataSplits("tokens", x, y, x[:4], y[:4], x[4:8], y[4:8], 4, (x.shape[1],))
    result = train(Recurrent("gru"), splits, TrainConfig(iterations=2, batch_size=8))
    assert result.final["val_acc"] is not None
    rare = [(x[:8], torch.zeros(8, dtype=torch.long)), (x[8:9], torch.ones(1, dtype=torch.long))]
    with pytest.raises(DataError, match=r"class\(es\) \[1\]"):
        winnow.score(Recurrent("gru"), "grasp", rare, samples_per_class=2)


def test_embedding_models_get_token_examples_for_synflow_and_structure():
    model = nn.Sequential(
        nn.Embedding(30, 8), nn.Flatten(), nn.Linear(8 * 5, 6), nn.ReLU(), nn.Linear(6, 3)
    )
    scores = winnow.score(model, "synflow", input_shape=(5,))
    assert all(bool(torch.isfinite(s).all()) for s in scores.values())
    groups = winnow.structured.find_groups(model, (5,))
    assert [g.size for g in groups if g.prunable] == [6]
    assert winnow.structured.count(model, (5,)).flops == 8 * 5 * 6 + 6 * 3


@needs_hf
def test_hugging_face_outputs_and_attention_take_snip_and_grasp():
    case = CASES["bert"]
    batches = case.data("list")
    for criterion in ("snip", "grasp"):
        options = {"samples_per_class": 4} if criterion == "grasp" else {}
        scores = winnow.score(case.model(), criterion, batches, **options)
        assert all(bool(torch.isfinite(s).all()) for s in scores.values())
    scores = winnow.score(TokenTransformer(), "grasp", tokens(), samples_per_class=4)
    assert any(bool(s.abs().sum() > 0) for s in scores.values())


def test_custom_loss_function():
    x, y = CASES["resnet"].x, CASES["resnet"].y

    def hinge(model, batch):
        logits = model(batch[0])
        return nn.functional.multi_margin_loss(logits, batch[1])

    model = CASES["resnet"].model()
    snip = winnow.score(model, "snip", (x, y), loss_fn=hinge)
    default = winnow.score(model, "snip", (x, y))
    assert not all(torch.equal(snip[n], default[n]) for n in snip)
    result = train(model, (x, y), TrainConfig(iterations=2, batch_size=8), loss_fn=hinge)
    assert math.isfinite(result.final["train_loss"])


# -- 3. training as users run it -----------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_masks(precision):
    case = CASES["resnet"]
    model = case.model()
    masks = winnow.prune_at_init(model, "magnitude", 0.5)
    config = TrainConfig(iterations=4, batch_size=8, precision=precision)
    result = train(model, (case.x, case.y), config, masks=masks)
    assert math.isfinite(result.final["train_loss"])
    for name, param in prunable_parameters(model).items():
        assert bool((param[~masks[name]] == 0).all()), name
        assert param.dtype == torch.float32  # autocast: the weights stay fp32


def test_accumulated_batches_equal_one_big_batch():
    case = CASES["grouped-cat"]
    data = (case.x, case.y)
    big, small = case.model(), case.model()
    train(big, data, TrainConfig(iterations=1, batch_size=8, optimizer="sgd", lr=0.1))
    train(
        small, data, TrainConfig(iterations=1, batch_size=4, accumulate=2, optimizer="sgd", lr=0.1)
    )
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_clipping_bounds_the_step():
    case = CASES["grouped-cat"]
    before = case.model()
    model = case.model()
    config = TrainConfig(
        iterations=1, batch_size=8, optimizer="sgd", lr=1.0, momentum=0.0, clip_norm=1e-3
    )
    train(model, (case.x, case.y), config)
    moved = torch.cat(
        [(a - b).flatten() for a, b in zip(model.parameters(), before.parameters(), strict=True)]
    )
    assert float(moved.norm()) <= 1e-3 * (1 + 1e-4)


def test_dataloader_with_workers_and_pinned_memory_and_iterable_evaluation():
    case = CASES["resnet"]
    loader = DataLoader(
        TensorDataset(case.x, case.y),
        batch_size=8,
        shuffle=True,
        num_workers=2,
        pin_memory=True,
        generator=torch.Generator().manual_seed(0),
    )
    held = [(case.x[:8], case.y[:8]), (case.x[8:16], case.y[8:16])]
    result = train(
        case.model(), loader, TrainConfig(epochs=1, batch_size=8), eval_splits={"held": held}
    )
    assert result.iterations == 4 and result.final["held_acc"] is not None


def test_crop_flip_augmentation_is_seeded_and_keeps_shapes():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    a = crop_flip(x, torch.Generator().manual_seed(0), fill=(-1.0, -2.0, -3.0))
    b = crop_flip(x, torch.Generator().manual_seed(0), fill=(-1.0, -2.0, -3.0))
    assert a.shape == x.shape and torch.equal(a, b)
    # every output pixel is a pixel of the image or the channel's fill value
    for c, fill in enumerate((-1.0, -2.0, -3.0)):
        values = set(x[:, c].flatten().tolist()) | {fill}
        assert set(a[:, c].flatten().tolist()) <= values
    case = CASES["resnet"]
    splits = DataSplits(
        "img",
        case.x,
        case.y,
        case.x[:8],
        case.y[:8],
        case.x[8:],
        case.y[8:],
        4,
        (3, 16, 16),
        augment="crop-flip",
    )
    runs = [train(case.model(), splits, TrainConfig(iterations=3, batch_size=8)) for _ in range(2)]
    assert runs[0].history == runs[1].history  # bit for bit under the seed
    plain = train(
        case.model(),
        DataSplits(**{**splits.__dict__, "augment": None}),
        TrainConfig(iterations=3, batch_size=8),
    )
    assert plain.history != runs[0].history
    with pytest.raises(ValueError, match="unknown augmentation"):
        DataSplits(**{**splits.__dict__, "augment": "mixup"})


def test_compiled_training():
    case = CASES["grouped-cat"]
    config = TrainConfig(iterations=2, batch_size=8, compile="eager")
    result = train(case.model(), (case.x, case.y), config)
    assert math.isfinite(result.final["train_loss"])


# -- 4. wrapped and foreign models ---------------------------------------------------------------
def test_enforce_on_compiled_and_ddp_models(tmp_path):
    import torch.distributed as dist

    case = CASES["grouped-cat"]
    model = case.model()
    masks = winnow.prune_at_init(model, "magnitude", 0.3)
    compiled = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9)
    winnow.enforce(compiled, masks, optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(compiled(case.x[:8]), case.y[:8]).backward()
        optimizer.step()
    for name, param in prunable_parameters(model).items():
        assert bool((param[~masks[name]] == 0).all())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        wrapped = nn.parallel.DistributedDataParallel(case.model())
        enforcer = winnow.enforce(wrapped, masks)
        assert list(enforcer.masks) == list(masks)
        assert list(winnow.prunable_parameters(wrapped)) == list(masks)
        winnow.save_sparse(wrapped, tmp_path / "ddp.sparse")
        assert not any(k.startswith("module.") for k in winnow.load_sparse(tmp_path / "ddp.sparse"))
    finally:
        dist.destroy_process_group()


def test_models_pruned_with_torch_prune_and_torch_ao(tmp_path):
    case = CASES["grouped-cat"]
    model = case.model()
    torch_prune.l1_unstructured(model.mix, "weight", amount=0.5)
    with pytest.raises(ValueError, match="from_torch_prune"):
        prunable_parameters(model)
    with pytest.raises(ValueError, match="from_torch_prune"):
        winnow.prune_at_init(model, "magnitude", 0.5)
    winnow.save_sparse(model, tmp_path / "m.sparse")
    state = winnow.load_sparse(tmp_path / "m.sparse")
    assert "mix.weight" in state and not any(k.endswith(("_orig", "_mask")) for k in state)
    GroupedCat().load_state_dict(state, strict=True)
    plain, masks = from_torch_prune(model)
    assert list(masks) == ["mix.weight"] and masks.density() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(plain.mix.weight, model.mix.weight)
    again = to_torch_prune(case.model(), masks)
    assert torch.equal(again.mix.weight_mask.bool(), masks["mix.weight"])
    ao = to_ao(case.model(), masks)
    back, ao_masks = from_ao(ao)
    assert torch.equal(ao_masks["mix.weight"], masks["mix.weight"])
    assert bool((back.mix.weight[~masks["mix.weight"]] == 0).all())


# -- 6. bad numbers ------------------------------------------------------------------------------
def test_a_nan_weight_is_an_error_naming_it():
    case = CASES["resnet"]
    model = case.model()
    with torch.no_grad():
        model.layer1.conv1.weight[0, 0, 0, 0] = float("nan")
    for criterion in ("snip", "magnitude", "synflow"):
        with pytest.raises(NonFiniteError, match=r"layer1\.conv1\.weight"):
            winnow.prune_at_init(model, criterion, 0.1, (case.x, case.y))


def test_an_all_nan_model_gets_no_mask():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteError):
        winnow.prune_at_init(model, "random", 0.1)


def test_a_diverged_run_reports_nan_as_nan_and_stops_or_continues():
    case = CASES["grouped-cat"]
    model = case.model()
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    config = TrainConfig(iterations=4, batch_size=8, eval_every=2)
    with pytest.raises(TrainingDiverged, match="training diverged at iteration 2") as caught:
        train(model, (case.x, case.y), config, eval_splits={"val": (case.x, case.y)})
    row = caught.value.result.history[-1]
    assert math.isnan(row["val_loss"]) and math.isnan(row["train_loss"])
    model = case.model()
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    result = train(
        model,
        (case.x, case.y),
        TrainConfig(iterations=4, batch_size=8, eval_every=2, on_nan="continue"),
        eval_splits={"val": (case.x, case.y)},
    )
    assert len(result.history) == 2 and math.isnan(result.history[-1]["val_loss"])


def test_empty_data_is_an_error():
    case = CASES["resnet"]
    empty = (case.x[:0], case.y[:0])
    with pytest.raises(DataError, match="empty"):
        train(case.model(), empty, TrainConfig(iterations=1))
    with pytest.raises(DataError, match="no batch"):
        train(case.model(), [], TrainConfig(iterations=1))
    with pytest.raises(DataError):
        winnow.score(case.model(), "snip", empty)
    with pytest.raises(DataError):
        winnow.evaluate(case.model(), empty)
    zero = train(case.model(), (case.x, case.y), TrainConfig(iterations=0))
    assert zero.final["train_loss"] is None  # no step taken: no loss, not NaN


# -- 7. the command line -------------------------------------------------------------------------
TRAIN = ["train", "--model", "lenet300", "--data", "synthetic"]
PRUNE = ["prune-at-init", "--model", "lenet300", "--data", "synthetic", "--method"]


def cli(capsys, *args):
    from winnow.cli import main

    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_device_everywhere_and_cuda_without_cuda_is_one_line(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from winnow.cli import parser

    commands = parser()._subparsers._group_actions[0].choices
    for name in ("train", "prune-at-init", "demo"):
        assert "--device" in commands[name].format_help(), name
    experiments = commands["experiment"]._subparsers._group_actions[0].choices
    for name in ("at-init", "lottery", "scratch"):
        assert "--device" in experiments[name].format_help(), name
    for args in (
        [*TRAIN, "--iterations", "1"],
        [*PRUNE, "snip", "--density", "0.1"],
        ["experiment", "at-init", "--data", "synthetic", "--results", tmp_path],
    ):
        status, out, err = cli(capsys, *args, "--device", "cuda")
        assert status == 2, args
        assert err.count("\n") == 1 and "CUDA is not available" in err, err


def test_every_option_has_help_and_a_default_or_is_required():
    import argparse

    from winnow.cli import parser

    def walk(p, path):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif action.option_strings and action.dest not in ("help", "version"):
                yield path, action

    missing = []
    for path, action in walk(parser(), "winnow"):
        text = action.help or ""
        switch = isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
        if not text or not (action.required or switch or "default" in text):
            missing.append(f"{path} {action.option_strings[-1]}")
    assert not missing, missing


def test_epochs_zero_and_percent_without_a_sign_are_errors(capsys):
    status, _, err = cli(capsys, *TRAIN, "--epochs", "0")
    assert status == 2 and "epochs must be > 0" in err
    with pytest.raises(SystemExit):
        cli(capsys, *PRUNE, "snip", "--density", "10")
    assert "write a fraction (0.1) or a percent with % (10%)" in capsys.readouterr().err
    status, out, _ = cli(capsys, *PRUNE, "magnitude", "--density", "10%")
    assert status == 0 and "10.00%" in out


def test_warnings_are_one_line():
    import subprocess
    import sys

    run = "import sys; from winnow.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [*PRUNE, "snip", "--density", "0.00001"]
    done = subprocess.run([sys.executable, "-c", run, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
    assert lines and all(line.startswith("winnow: warning: ") for line in lines), lines
    assert "layer collapse" in lines[0] and "warnings.warn" not in done.stderr


@pytest.mark.parametrize("experiment", ["at-init", "lottery"])
def test_every_run_directory_packs(capsys, tmp_path, experiment):
    import json

    args = ["experiment", experiment, "--data", "synthetic", "--seeds", "0", "--iterations", "2"]
    args += ["--data-limit", "64", "--results", tmp_path, "--no-progress"]
    if experiment == "at-init":
        args += ["--methods", "snip", "--densities", "10%", "--controls", "shuffle"]
    else:
        args += ["--rounds", "1", "--controls", "none"]
    status, out, err = cli(capsys, *args)
    assert status == 0, err
    runs = [p for p in (tmp_path / experiment).iterdir() if p.is_dir()]
    if experiment == "at-init":  # the method's runs are in the sweep beside the control's
        controls = {json.loads((r / "config.json").read_text())["config"]["control"] for r in runs}
        assert {"none", "shuffle"} <= controls
    for run in runs:
        status, out, err = cli(capsys, "pack", run, "--out", tmp_path / f"{run.name}.sparse")
        assert status == 0, (run, err)
    masks = next((tmp_path / experiment).rglob("mask*.safetensors"))
    status, out, _ = cli(capsys, "inspect", masks)
    assert status == 0 and "mask file" in out
