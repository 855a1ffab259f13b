"""Enforcement: pruned weights stay exactly zero through training, with standard state_dicts."""

import copy

import pytest
import torch
from torch import nn

from winnow import Masks, enforce, models, prunable_parameters
from winnow.core.enforcement import ZERO_PRESERVING


def random_masks(model, density=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Masks(
        {
            n: torch.rand(p.shape, generator=gen) < density
            for n, p in prunable_parameters(model).items()
        }
    )


OPTIMIZERS = {
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam_wd": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3, fused=True),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "sgd_fused": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, weight_decay=5e-4, fused=True
    ),
}


def run_steps(model, optimizer, steps, seed=0, check_grads=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 1, 12, 12, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if check_grads is not None:
            check_grads()


@pytest.mark.parametrize("rezero", [None, True], ids=["default", "rezero"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("arch", ["lenet300", "conv2"])
def test_exact_zeros_after_100_steps(name, arch, rezero):
    model = models.create(arch, input_size=12)
    masks = random_masks(model)
    optimizer = OPTIMIZERS[name](model.parameters())
    enforcer = enforce(model, masks, optimizer, rezero=rezero)
    # a gradient hook per tensor, the pre-step check (+ the re-zeroing)
    assert len(enforcer._handles) == len(masks) + 1 + (rezero is True)
    params = prunable_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}

    def grads_are_masked():
        for n, p in params.items():
            assert torch.all(p.grad[~masks[n]] == 0)

    run_steps(model, optimizer, 100, check_grads=grads_are_masked)
    for n, p in params.items():
        assert torch.all(p[~masks[n]] == 0.0), n
        assert not torch.equal(p[masks[n]], before[n][masks[n]]), f"{n} did not train"


@pytest.mark.parametrize("cls", ZERO_PRESERVING, ids=lambda c: c.__name__)
def test_zero_preserving_optimizers_keep_zeros_without_rezeroing(cls):
    """The claim behind skipping the re-zeroing hook, checked for every listed optimizer."""
    model = models.create("lenet300", input_size=12)
    masks = random_masks(model, 0.3)
    kwargs = {"weight_decay": 0.01}
    if cls is torch.optim.SGD:
        kwargs.update(lr=0.05, momentum=0.9, nesterov=True)
    if cls is torch.optim.RMSprop:
        kwargs.update(momentum=0.5, centered=True)
    optimizer = cls(model.parameters(), **kwargs)
    enforce(model, masks, optimizer, rezero=False)
    run_steps(model, optimizer, 100)
    for n, p in prunable_parameters(model).items():
        assert torch.all(p[~masks[n]] == 0.0), n


def test_unknown_optimizer_gets_the_rezeroing_hook():
    class Drift(torch.optim.SGD):
        """An update rule that moves every weight, even with a zero gradient."""

        @torch.no_grad()
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(1e-3)

    model = models.create("lenet300", input_size=12)
    masks = random_masks(model)
    optimizer = Drift(model.parameters(), lr=0.01)
    enforcer = enforce(model, masks, optimizer)
    assert len(enforcer._handles) == len(masks) + 2
    run_steps(model, optimizer, 10)
    for n, p in prunable_parameters(model).items():
        assert torch.all(p[~masks[n]] == 0.0)


def test_masks_applied_after_dense_training_clear_optimizer_state():
    """Momentum accumulated before pruning must not revive pruned weights."""
    model = models.create("lenet300", input_size=12)
    for make in (OPTIMIZERS["adam"], OPTIMIZERS["sgd_momentum_wd"]):
        optimizer = make(model.parameters())
        run_steps(model, optimizer, 20)  # dense: state is non-zero everywhere
        masks = random_masks(model, 0.2, seed=1)
        enforcer = enforce(model, masks, optimizer)
        for n, p in prunable_parameters(model).items():
            for value in optimizer.state[p].values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert torch.all(value[~masks[n]] == 0)
        run_steps(model, optimizer, 30, seed=3)
        for n, p in prunable_parameters(model).items():
            assert torch.all(p[~masks[n]] == 0.0)
        enforcer.remove()


def test_without_optimizer_zero_pruned_restores_zeros():
    model = models.create("lenet300", input_size=12)
    masks = random_masks(model)
    enforcer = enforce(model, masks)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    enforcer.zero_pruned()
    for n, p in prunable_parameters(model).items():
        assert torch.all(p[~masks[n]] == 0.0)


def test_state_dict_keys_unchanged_and_loads_into_fresh_model():
    model = models.create("conv2", input_size=12)
    keys = list(model.state_dict())
    masks = random_masks(model)
    optimizer = OPTIMIZERS["adam"](model.parameters())
    with enforce(model, masks, optimizer):
        run_steps(model, optimizer, 5)
        assert list(model.state_dict()) == keys
    fresh = models.create("conv2", input_size=12, seed=99)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 1, 12, 12)
    assert torch.equal(fresh(x), model(x))


def test_deepcopy_of_enforced_model_trains_with_zeros():
    model = models.create("lenet300", input_size=12)
    masks = random_masks(model)
    optimizer = OPTIMIZERS["sgd_momentum_wd"](model.parameters())
    enforce(model, masks, optimizer)
    clone = copy.deepcopy(model)
    clone_opt = OPTIMIZERS["adamw"](clone.parameters())
    enforce(clone, masks, clone_opt)
    run_steps(clone, clone_opt, 10)
    for n, p in prunable_parameters(clone).items():
        assert torch.all(p[~masks[n]] == 0.0)
    # the original is untouched by the copy's training
    assert not torch.equal(
        next(iter(prunable_parameters(clone).values())),
        next(iter(prunable_parameters(model).values())),
    )


def test_remove_detaches_hooks():
    model = models.create("lenet300", input_size=12)
    masks = random_masks(model)
    optimizer = OPTIMIZERS["sgd_momentum_wd"](model.parameters())
    enforcer = enforce(model, masks, optimizer)
    enforcer.remove()
    run_steps(model, optimizer, 3)
    pruned_nonzero = sum(
        int((p[~masks[n]] != 0).sum()) for n, p in prunable_parameters(model).items()
    )
    assert pruned_nonzero > 0


def test_tied_weights_enforced_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.out = nn.Linear(8, 20, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, x):
            return self.out(self.embed(x))

    model = Tied()
    masks = random_masks(model, 0.5)
    assert list(masks) == ["embed.weight"]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    enforce(model, masks, optimizer)
    for _ in range(20):
        x = torch.randint(0, 20, (8,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), x).backward()
        optimizer.step()
    assert torch.all(model.out.weight[~masks["embed.weight"]] == 0)
    assert set(model.state_dict()) == {"embed.weight", "out.weight"}


@pytest.mark.parametrize("change", ["noise", "replaced", "scaled"])
@pytest.mark.parametrize("name", ["adamw", "sgd_momentum_wd"])
def test_masks_hold_whatever_the_loop_does_to_the_gradient(name, change):
    """Differential-privacy noise added to .grad, a .grad replaced by a new tensor, or one
    scaled in place after backward: the step still sees zeros on pruned entries (issue 15:
    15,757 pruned weights came back after 3 steps when the mask acted at accumulation)."""
    model = models.create("lenet300", input_size=12)
    masks = random_masks(model)
    optimizer = OPTIMIZERS[name](model.parameters())
    enforce(model, masks, optimizer)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(16, 1, 12, 12, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            if change == "noise":
                p.grad.add_(torch.randn(p.shape, generator=gen))
            elif change == "replaced":
                p.grad = torch.randn(p.shape, generator=gen)
            else:
                p.grad.mul_(3.0)
        optimizer.step()
    revived = sum(int((p[~masks[n]] != 0).sum()) for n, p in prunable_parameters(model).items())
    assert revived == 0


def test_mask_gradients_masks_what_changed_since_backward():
    model = models.create("lenet300", input_size=12)
    masks = random_masks(model)
    optimizer = OPTIMIZERS["sgd_momentum_wd"](model.parameters())
    enforcer = enforce(model, masks, optimizer)
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    params = prunable_parameters(model)
    assert all(bool((p.grad[~masks[n]] == 0).all()) for n, p in params.items())
    for p in params.values():
        p.grad.add_(1.0)
    enforcer.mask_gradients()
    assert all(bool((p.grad[~masks[n]] == 0).all()) for n, p in params.items())


def test_without_optimizer_gradients_are_masked_as_they_accumulate():
    model = models.create("lenet300", input_size=12)
    masks = random_masks(model)
    enforce(model, masks)
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    for n, p in prunable_parameters(model).items():
        assert torch.all(p.grad[~masks[n]] == 0), n
