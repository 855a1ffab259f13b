"""Removing hidden neurons of fully connected chains, compensated in the next layer.

Both methods act on a ``Linear -> activation -> Linear`` chain inside an ``nn.Sequential``
(LeNet-300-100, the MLPs of the zoo, a classifier head) and return a new model with the
removed neurons' weights at zero (incoming row, bias and outgoing column), the change folded
into the next layer, and the masks of the removed weights:

- :func:`fold_constant_neurons`, data-driven sensitivity (Hoefler et al. 2021, §3.3; e.g.
  Sietsma & Dow 1988): a neuron whose activation barely varies over the data carries no
  information; it is removed and its mean output a_j folded into the next layer's bias,
  b' ← b' + W'[:, j] · mean(a_j). Exact when the neuron is constant.
- :func:`merge_neurons`, data-free (Srinivas & Babu 2015, "Data-free parameter pruning for
  deep neural networks"): two neurons i, j with similar incoming weights (bias included)
  compute similar activations, so j is merged into i, W'[:, i] ← W'[:, i] + W'[:, j], at a
  cost estimated by the saliency s_ij = ‖W'[:, j]‖² · ‖w_i − w_j‖²; the pair of least saliency
  goes first, one merge at a time.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from winnow.core.masks import Masks
from winnow.core.prunable import prunable_parameters

ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
    nn.Dropout,
)


def linear_chains(model: nn.Module) -> list[tuple[str, str]]:
    """The ``(first, second)`` module names of every Linear -> elementwise -> Linear chain in
    the model's ``nn.Sequential`` containers (the first Linear's outputs feed the second's
    inputs one to one)."""
    chains = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for i, (name, child) in enumerate(children):
            if not isinstance(child, nn.Linear):
                continue
            for next_name, following in children[i + 1 :]:
                if isinstance(following, nn.Linear):
                    join = f"{prefix}." if prefix else ""
                    chains.append((join + name, join + next_name))
                    break
                if not isinstance(following, ELEMENTWISE):
                    break
    return chains


def _masks_for(model: nn.Module, removed: dict[tuple[str, str], Tensor]) -> Masks:
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model).items()}
    for (first, second), gone in removed.items():
        masks[f"{first}.weight"][gone] = False
        masks[f"{second}.weight"][:, gone] = False
    return Masks(masks)


def _check_chain(model: nn.Module, chain: tuple[str, str] | None) -> list[tuple[str, str]]:
    chains = linear_chains(model)
    if not chains:
        raise ValueError("the model has no Linear -> activation -> Linear chain")
    if chain is None:
        return chains
    if tuple(chain) not in chains:
        raise ValueError(f"{chain} is not a Linear -> activation -> Linear chain; found {chains}")
    return [tuple(chain)]


@torch.no_grad()
def _remove(first: nn.Linear, second: nn.Linear, gone: Tensor) -> None:
    first.weight[gone] = 0
    if first.bias is not None:
        first.bias[gone] = 0
    second.weight[:, gone] = 0


@torch.no_grad()
def neuron_statistics(
    model: nn.Module, chain: tuple[str, str], x: Tensor, batch_size: int = 1000
) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation over ``x`` of each input of ``chain[1]`` (the activations
    of the first Linear's neurons after the elementwise layers), with the model in eval mode."""
    second = model.get_submodule(chain[1])
    inputs = []
    handle = second.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].double()))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    acts = torch.cat(inputs)
    return acts.mean(0), acts.std(0, correction=0)


@torch.no_grad()
def fold_constant_neurons(
    model: nn.Module,
    x: Tensor,
    tolerance: float | None = None,
    count: int | None = None,
    chain: tuple[str, str] | None = None,
) -> tuple[nn.Module, Masks]:
    """Remove the neurons whose activation varies least over the inputs ``x``, folding their
    mean into the next layer's bias: b' ← b' + W'[:, j]·mean(a_j) (exact for a constant neuron).

    Removes, in every chain (or the one named), the neurons with standard deviation <=
    ``tolerance``, or the ``count`` of least deviation. Returns a new model and its masks;
    ``model`` is not changed.
    """
    if (tolerance is None) == (count is None):
        raise ValueError("give exactly one of tolerance and count")
    work = copy.deepcopy(model)
    removed = {}
    for pair in _check_chain(work, chain):
        mean, std = neuron_statistics(work, pair, x)
        first, second = work.get_submodule(pair[0]), work.get_submodule(pair[1])
        if count is not None:
            if not 0 <= count <= len(std):
                raise ValueError(f"count {count} is outside [0, {len(std)}] for {pair[0]}")
            gone = torch.argsort(std, stable=True)[:count]
        else:
            gone = torch.nonzero(std <= tolerance).flatten()
        gone = gone.to(first.weight.device)
        if second.bias is None:
            second.bias = nn.Parameter(torch.zeros_like(second.weight[:, 0]))
        second.bias += second.weight[:, gone].double() @ mean[gone.cpu()].to(second.weight.device)
        _remove(first, second, gone)
        removed[pair] = gone
    return work, _masks_for(work, removed)


def merge_saliency(incoming: Tensor, outgoing: Tensor) -> Tensor:
    """s_ij = ‖W'[:, j]‖² · ‖w_i − w_j‖² (Srinivas & Babu 2015) for every pair, as a matrix;
    the diagonal is +inf. ``incoming`` (n, d): each neuron's input weights and bias;
    ``outgoing`` (m, n): the next layer's weight."""
    distance = torch.cdist(incoming.double(), incoming.double()).pow(2)
    saliency = outgoing.double().pow(2).sum(0).unsqueeze(0) * distance
    saliency.fill_diagonal_(float("inf"))
    return saliency


@torch.no_grad()
def merge_neurons(
    model: nn.Module, count: int, chain: tuple[str, str] | None = None
) -> tuple[nn.Module, Masks]:
    """Remove ``count`` neurons of every chain (or the one named) by merging each into its
    most similar surviving neuron, least saliency first (Srinivas & Babu 2015): the next layer
    takes W'[:, i] ← W'[:, i] + W'[:, j] and neuron j is removed. Data-free. Returns a new
    model and its masks; ``model`` is not changed."""
    work = copy.deepcopy(model)
    removed = {}
    for pair in _check_chain(work, chain):
        first, second = work.get_submodule(pair[0]), work.get_submodule(pair[1])
        n = first.out_features
        if not 0 <= count < n:
            raise ValueError(f"count {count} is outside [0, {n - 1}] for {pair[0]}")
        incoming = first.weight.reshape(n, -1)
        if first.bias is not None:
            incoming = torch.cat([incoming, first.bias.unsqueeze(1)], 1)
        saliency = merge_saliency(incoming, second.weight)
        alive = torch.ones(n, dtype=torch.bool)
        gone = []
        for _ in range(count):
            flat = int(torch.argmin(saliency))
            i, j = divmod(flat, n)  # keep i, remove j
            second.weight[:, i] += second.weight[:, j]
            second.weight[:, j] = 0
            alive[j] = False
            gone.append(j)
            saliency[:, j] = float("inf")
            saliency[j, :] = float("inf")
            # neuron i's outgoing weights changed: its column of saliencies scales with them
            norm = second.weight[:, i].double().pow(2).sum()
            column = torch.cdist(incoming.double(), incoming[i : i + 1].double()).pow(2).flatten()
            saliency[:, i] = torch.where(alive, norm * column, torch.inf)
            saliency[i, i] = float("inf")
        gone_t = torch.tensor(gone, dtype=torch.long, device=first.weight.device)
        _remove(first, second, gone_t)
        removed[pair] = gone_t
    return work, _masks_for(work, removed)
