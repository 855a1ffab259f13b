"""Golden cases: every criterion and schedule on fixed seeds, as tensors to compare bit for bit.

Each case returns ``{key: tensor}`` (scores, masks as bool, trained weights). The expected
tensors were written by the code before the pipeline was restructured (``tests/fixtures/
golden.safetensors``, by ``python tests/golden_cases.py --write``); ``test_golden.py`` checks
that today's code still produces them exactly, on the same kind of processor and torch version.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import winnow
from winnow import criteria, models

FIXTURE = Path(__file__).parent / "fixtures" / "golden.safetensors"


def _data():
    return winnow.data.load("synthetic", n_train=400, n_test=100, input_shape=(1, 8, 8))


def _mlp(seed: int = 0):
    return models.create("mlp", input_size=8, num_classes=4, hidden=[32, 16], seed=seed)


def _resnet(seed: int = 0):
    return models.create("resnet20", input_size=8, num_classes=4, width=4, seed=seed)


def _vgg(seed: int = 0):
    widths = [8, 16, 16, 16, 32, 32, 32, 32]
    return models.create("vgg11", input_size=32, num_classes=4, widths=widths, seed=seed)


def _masks(prefix: str, masks) -> dict[str, torch.Tensor]:
    return {f"{prefix}/mask/{n}": m.clone() for n, m in masks.items()}


def _state(prefix: str, model) -> dict[str, torch.Tensor]:
    return {f"{prefix}/state/{n}": t.detach().clone() for n, t in model.state_dict().items()}


CRITERION_OPTIONS = {
    "random": {"seed": 3},
    "magnitude": {},
    "snip": {"samples": 64},
    "grasp": {"samples_per_class": 8},
    "synflow": {},
    "obd": {"samples": 32},
    "woodfisher": {"samples": 32, "block_size": 8},
    "taylor": {"samples": 64, "batch_size": 32},
}


def criteria_cases() -> dict[str, torch.Tensor]:
    """Scores and global top-20% masks of every criterion, on an MLP and on a ResNet."""
    data = _data()
    out = {}
    for arch, build in (("mlp", _mlp), ("resnet", _resnet)):
        for method, options in CRITERION_OPTIONS.items():
            if arch == "resnet" and method in ("obd", "woodfisher"):
                continue  # per-sample gradients: slow, and the MLP covers them
            scores = criteria.score(build(), method, data, **options)
            for name, value in scores.items():
                out[f"score/{arch}/{method}/{name}"] = value.clone()
            out.update(_masks(f"select/{arch}/{method}", winnow.select(scores, 0.2)))
    return out


def at_init_cases() -> dict[str, torch.Tensor]:
    """prune_at_init one-shot, iterative (SynFlow's rounds, SNIP per layer with a guard)."""
    data = _data()
    out = {}
    out.update(_masks("at-init/snip", winnow.prune_at_init(_mlp(), "snip", 0.1, data)))
    out.update(
        _masks("at-init/synflow", winnow.prune_at_init(_resnet(), "synflow", 0.05, data, rounds=10))
    )
    layered = winnow.prune_at_init(
        _resnet(), "snip", 0.1, data, rounds=3, scope="layer", min_per_layer=2, samples=64
    )
    out.update(_masks("at-init/snip-layer", layered))
    grasp = winnow.prune_at_init(_resnet(), "grasp", 0.2, data, samples_per_class=4)
    out.update(_masks("at-init/grasp", grasp))
    return out


def _config(**options):
    return winnow.TrainConfig(**{"iterations": 40, "batch_size": 32, "lr": 3e-3, **options})


def lottery_cases() -> dict[str, torch.Tensor]:
    """Iterative magnitude pruning: reset to θ₀ per layer, and rewinding with global scope."""
    from winnow.schedules import iterative_magnitude_pruning

    data = _data()
    out = {}
    for tag, options in (
        ("reset", {"rate": 0.5}),
        ("rewind", {"rate": 0.4, "scope": "global", "rewind_iteration": 10}),
    ):
        rounds = iterative_magnitude_pruning(_mlp(), data, _config(eval_every=20), 2, **options)
        for r in rounds:
            out.update(_masks(f"lottery/{tag}/round{r.round}", r.next_masks))
            for name, value in r.trained.items():
                out[f"lottery/{tag}/round{r.round}/trained/{name}"] = value.clone()
    return out


def during_training_cases() -> dict[str, torch.Tensor]:
    """Gradual pruning, dense-sparse-dense, and one-shot after training with fine-tuning."""
    from winnow.schedules import DenseSparseDense, GradualPruner

    data = _data()
    out = {}
    model = _mlp()
    result = winnow.train(
        model, data, _config(iterations=80), pruner=GradualPruner(0.8, 10, 60, 10)
    )
    out.update(_masks("gradual", result.masks))
    out.update(_state("gradual", model))
    model = _mlp()
    result = winnow.train(
        model,
        data,
        _config(iterations=80, optimizer="sgd", lr=0.05),
        pruner=DenseSparseDense([(20, 0.3), (50, 1.0), (65, 0.5)], scope="layer"),
    )
    out.update(_masks("dsd", result.masks))
    out.update(_state("dsd", model))
    model = _mlp()
    winnow.train(model, data, _config(iterations=50))
    masks = winnow.prune_at_init(model, "magnitude", 0.2)
    tuned = masks.apply(copy.deepcopy(model))
    winnow.train(tuned, data, _config(iterations=30, optimizer="sgd", lr=0.02), masks=masks)
    out.update(_masks("after", masks))
    out.update(_state("after", tuned))
    return out


def obs_cases() -> dict[str, torch.Tensor]:
    """WoodFisher pruning with the OBS update of the remaining weights."""
    from winnow.schedules import obs_prune

    data = _data()
    model = _mlp()
    winnow.train(model, data, _config(iterations=40))
    pruned, masks = obs_prune(model, 0.3, data, samples=48, block_size=16)
    return {**_masks("obs", masks), **_state("obs", pruned)}


def training_cases() -> dict[str, torch.Tensor]:
    """train with SGD, momentum, step schedule, warm-up and masks; regularisers; L0; SVDO."""
    from winnow.regularizers import L1, GroupLasso, L0HardConcrete
    from winnow.variational import KLPenalty, from_svdo, to_svdo

    data = _data()
    out = {}
    model = _resnet()
    masks = winnow.prune_at_init(model, "random", 0.3, seed=1)
    config = _config(
        iterations=30,
        optimizer="sgd",
        lr=0.05,
        nesterov=True,
        weight_decay=1e-3,
        lr_schedule="step",
        milestones=(15, 25),
        warmup=5,
    )
    result = winnow.train(model, data, config, masks=masks)
    out.update(_state("train-sgd", model))
    out["train-sgd/val_loss"] = torch.tensor([row["val_loss"] for row in result.history])
    model = _mlp()
    winnow.train(model, data, _config(iterations=30, optimizer="adamw"), regularizer=L1(1e-3))
    out.update(_state("l1", model))
    model = _mlp()
    winnow.train(model, data, _config(iterations=30), regularizer=GroupLasso(1e-3, "neuron"))
    out.update(_state("group-lasso", model))
    gated, l0 = L0HardConcrete.attach(_mlp(), strength=0.1)
    winnow.train(gated, data, _config(iterations=30), regularizer=l0)
    plain, l0_masks = L0HardConcrete.finalize(gated)
    out.update(_masks("l0", l0_masks))
    out.update(_state("l0", plain))
    svdo = to_svdo(_mlp())
    winnow.train(svdo, data, _config(iterations=30), regularizer=KLPenalty(1 / 400, warmup=10))
    plain, vd_masks = from_svdo(svdo, threshold=3.0)
    out.update(_masks("svdo", vd_masks))
    out.update(_state("svdo", plain))
    return out


def structured_cases() -> dict[str, torch.Tensor]:
    """Gates learned by Pruning from Scratch, its structure, slimming, L1-filter, groups."""
    from winnow import structured
    from winnow.core.groups import select_groups

    data = winnow.data.load("synthetic", n_train=256, n_test=64, input_shape=(1, 32, 32))
    out = {}
    model = _vgg()
    found = structured.learn_gates(model, data, epochs=2, batch_size=64, seed=1)
    for name, gate in found.gates.items():
        out[f"gates/{name}"] = gate.clone()
    analysis = structured.analyse(model, data.input_shape)
    structure = structured.threshold_for_budget(found.gates, analysis, 0.5, seed=1)
    for name, mask in structure.masks.items():
        out[f"scratch/{name}"] = mask.clone()
    slim, trained, _ = structured.network_slimming(
        _vgg(), data, 0.5, _config(iterations=20, batch_size=64), seed=0
    )
    for name, mask in slim.masks.items():
        out[f"slimming/{name}"] = mask.clone()
    l1 = structured.l1_filter_structure(trained, 0.5, data.input_shape, scope="layer", seed=0)
    for name, mask in l1.masks.items():
        out[f"l1-filter/{name}"] = mask.clone()
    shrunk, _ = winnow.shrink(trained, slim.masks, data.input_shape)
    out.update(_state("shrunk", shrunk))
    scores = criteria.score(_mlp(), "magnitude")
    out.update(_masks("groups/neuron", select_groups(scores, 0.5, "neuron", reduce="sum")))
    out.update(
        _masks("groups/block", select_groups(scores, 0.25, (2, 4), scope="global", reduce="l2"))
    )
    return out


CASES: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "criteria": criteria_cases,
    "at_init": at_init_cases,
    "lottery": lottery_cases,
    "during_training": during_training_cases,
    "obs": obs_cases,
    "training": training_cases,
    "structured": structured_cases,
}


def platform() -> dict[str, str]:
    """What bit-for-bit equality depends on: torch's version and the CPU kernels it picks."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": "1",
    }


def compute(case: str) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {f"{case}/{k}": v.detach().cpu().contiguous() for k, v in CASES[case]().items()}
    finally:
        torch.set_num_threads(threads)


def write() -> None:
    from safetensors.torch import save_file

    tensors = {}
    for case in CASES:
        tensors.update(compute(case))
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(FIXTURE), metadata=platform())
    print(f"{len(tensors)} tensors written to {FIXTURE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/golden_cases.py --write")
    write()
