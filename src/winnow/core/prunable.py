"""Which weights a mask covers: rules over module types and names, a report, wrapped models.

The default rules (:data:`DEFAULT_RULES`) cover the weight matrices of

- ``nn.Linear`` (and subclasses, such as ``MultiheadAttention.out_proj``), ``nn.Conv1d/2d/3d``
  and ``nn.ConvTranspose1d/2d/3d``: ``weight``;
- ``nn.LSTM``, ``nn.GRU``, ``nn.RNN``: every ``weight_ih_l*``, ``weight_hh_l*`` (and the LSTM's
  projection ``weight_hr_l*``);
- ``nn.MultiheadAttention``: ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``,
  ``v_proj_weight`` when the key and value sizes differ);
- Hugging Face's ``Conv1D`` (GPT-2's layers), recognised by its class name, without importing
  transformers: ``weight``;
- ``nn.Embedding``: ``weight`` of token embeddings. Position and token-type embeddings (module
  names ending in ``position_embeddings``, ``token_type_embeddings``, ``wpe``, ``pos_embed``…)
  are left dense by default: they are small and every position is used.

Never biases or normalisation parameters. :class:`Rules` adds module types (or class names) and
name patterns to include or exclude; ``prunable_parameters(model, report=True)`` returns a
:class:`PrunableReport` listing the weight tensors covered and those skipped with the reason,
and a model with weight matrices no rule covers gets one :class:`UncoveredWeightsWarning` per
model class.

Wrapped models resolve to the model they wrap (:func:`unwrap`): ``torch.compile``'s
``OptimizedModule``, ``DistributedDataParallel``, ``DataParallel`` and FSDP's wrapper, so masks
and saved state_dicts carry the plain parameter names.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
RECURRENT = (nn.RNNBase,)
RECURRENT_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?")
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
POSITIONAL = re.compile(
    r"(^|\.)(wpe|position_embeddings?|token_type_embeddings?|pos_embed\w*|"
    r"positional_embeddings?|embed_positions)$"
)
"""Module names of position and token-type embeddings, left dense by default."""


class UncoveredWeightsWarning(UserWarning):
    """A model has weight matrices that no prunable rule covers (they stay dense)."""


@dataclass(frozen=True)
class Rules:
    """Which weights are prunable, beyond or instead of the defaults.

    ``include_types`` / ``exclude_types``: module classes (or class names, for classes of
    packages winnow does not import) whose ``weight`` is / is not prunable; ``include`` /
    ``exclude``: regular expressions searched in the full parameter name
    (``"encoder.layers.0.linear1.weight"``); an excluded name wins over an included one.
    ``positional``: whether position and token-type embeddings are prunable.
    """

    include_types: tuple[type | str, ...] = ()
    exclude_types: tuple[type | str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    positional: bool = False


DEFAULT_RULES = Rules()


def _is(module: nn.Module, kinds: tuple[type | str, ...]) -> bool:
    return any(
        type(module).__name__ == kind if isinstance(kind, str) else isinstance(module, kind)
        for kind in kinds
    )


def _default_weights(module_name: str, module: nn.Module, rules: Rules) -> tuple[list[str], str]:
    """The parameter names of ``module`` (own, not recursive) the default rules cover, and the
    rule's name; or why they are skipped."""
    own = dict(module.named_parameters(recurse=False))
    if _is(module, rules.exclude_types):
        return [], "excluded module type"
    if _is(module, rules.include_types):
        return (["weight"] if "weight" in own else []), "included module type"
    if isinstance(module, nn.Embedding):
        if not rules.positional and POSITIONAL.search(module_name):
            return [], "position or token-type embedding (dense by default)"
        return ["weight"], "Embedding"
    if isinstance(module, (nn.Linear, *CONVS)) or type(module).__name__ == "Conv1D":
        return (["weight"] if "weight" in own else []), type(module).__name__
    if isinstance(module, RECURRENT):
        return [n for n in own if RECURRENT_WEIGHT.fullmatch(n)], type(module).__name__
    if isinstance(module, nn.MultiheadAttention):
        return [n for n in ATTENTION_WEIGHTS if own.get(n) is not None], "MultiheadAttention"
    return [], f"no rule for {type(module).__name__}"


@dataclass
class PrunableReport:
    """What the rules make of a model's weight tensors (parameters of two or more dimensions,
    and Embedding tables): ``covered`` maps a name to ``(shape, rule)``, ``skipped`` to
    ``(shape, why)``."""

    covered: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    skipped: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)

    def covered_weights(self) -> int:
        return sum(_numel(shape) for shape, _ in self.covered.values())

    def skipped_weights(self) -> int:
        return sum(_numel(shape) for shape, _ in self.skipped.values())

    def table(self) -> str:
        """One line per weight tensor: covered or skipped, shape, and the rule or reason."""
        lines = []
        for title, entries in (("covered", self.covered), ("skipped", self.skipped)):
            for name, (shape, why) in entries.items():
                lines.append(f"{title:<8} {name:<50} {'x'.join(map(str, shape)):<14} {why}")
        lines.append(
            f"{self.covered_weights():,} weights in {len(self.covered)} tensors covered, "
            f"{self.skipped_weights():,} in {len(self.skipped)} skipped"
        )
        return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def unwrap(model: nn.Module) -> nn.Module:
    """The model a wrapper holds: ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``),
    ``DistributedDataParallel`` and ``DataParallel`` (``module``) and FSDP's wrapper
    (``_fsdp_wrapped_module``), through any nesting of them; any other model as it is."""
    while True:
        inner = None
        if type(model).__name__ == "OptimizedModule":
            inner = getattr(model, "_orig_mod", None)
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        elif type(model).__name__ in ("FullyShardedDataParallel", "FSDP"):
            inner = getattr(model, "_fsdp_wrapped_module", getattr(model, "module", None))
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def tied_parameter_names(model: nn.Module) -> dict[str, str]:
    """Map every alias of a shared (tied) parameter to its canonical name.

    The canonical name is the one ``model.named_parameters()`` reports (the first registration);
    aliases are the other names under which the same tensor appears in ``state_dict``.
    """
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        first = canonical.setdefault(id(param), name)
        if first != name:
            aliases[name] = first
    return aliases


_WARNED: set[type] = set()


def prunable_parameters(
    model: nn.Module,
    names: Iterable[str] | None = None,
    *,
    rules: Rules | None = None,
    report: bool = False,
) -> dict[str, nn.Parameter] | PrunableReport:
    """The parameters a mask covers, by fully qualified name, in model order.

    Without ``names``: the weights :data:`DEFAULT_RULES` (or ``rules``) cover, see the module
    docstring. A weight shared by several modules (tied weights) appears once, under its
    canonical name. With ``names``: exactly those parameters; an unknown name, or the alias of
    a tied weight, raises ``ValueError`` naming it. ``report=True`` returns a
    :class:`PrunableReport` instead. A wrapped model (``torch.compile``, DDP, FSDP) is unwrapped
    first, so the names are the plain model's. A model still carrying ``torch.nn.utils.prune``
    reparametrisations is an error that says how to convert it
    (:func:`winnow.core.interop.from_torch_prune`).
    """
    model = unwrap(model)
    _refuse_torch_prune(model)
    params = dict(model.named_parameters())
    if names is not None:
        chosen = named_parameters(model, names)
        if not chosen:
            raise ValueError("no parameter names given")
        return chosen
    rules = rules or DEFAULT_RULES
    found = _apply_rules(model, params, rules)
    if report:
        return found
    chosen = {name: params[name] for name in found.covered}
    if not chosen:
        raise ValueError(
            f"{type(model).__name__} has no prunable layer (Linear, convolution, recurrent, "
            "attention or embedding weights); pass the parameter names to prune explicitly "
            "(names=...) or rules=Rules(include_types=...)"
        )
    uncovered = {n: why for n, (_, why) in found.skipped.items() if why.startswith("no rule")}
    if uncovered and rules is DEFAULT_RULES and type(model) not in _WARNED:
        _WARNED.add(type(model))
        shown = ", ".join(
            f"{n} ({why.removeprefix('no rule for ')})" for n, why in uncovered.items()
        )
        warnings.warn(
            f"{type(model).__name__}: {len(uncovered)} weight tensor(s) no prunable rule covers "
            f"stay dense: {shown[:300]}; pass rules=Rules(include_types=...) or names=... to "
            "prune them (prunable_parameters(model, report=True) lists them)",
            UncoveredWeightsWarning,
            stacklevel=2,
        )
    return chosen


def named_parameters(
    model: nn.Module, names: Iterable[str], what: str = "parameter"
) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` (unwrapped) called ``names``, in that order; ``ValueError``
    naming an unknown name, or the alias of a tied weight with its canonical name (``what``
    says what named it: a parameter, a mask)."""
    model = unwrap(model)
    params = dict(model.named_parameters())
    aliases = tied_parameter_names(model)
    chosen: dict[str, nn.Parameter] = {}
    for name in names:
        if name in aliases:
            raise ValueError(
                f"{what} {name!r} names a tied parameter (tied to {aliases[name]!r}, the same "
                f"tensor); use its canonical name {aliases[name]!r}"
            )
        if name not in params:
            raise ValueError(
                f"{what} {name!r} matches no parameter of {type(model).__name__} "
                f"(no parameter named {name!r})"
            )
        chosen[name] = params[name]
    return chosen


def _apply_rules(model: nn.Module, params: dict, rules: Rules) -> PrunableReport:
    by_id = {id(p): n for n, p in params.items()}
    covered: dict[str, tuple[tuple[int, ...], str]] = {}
    skipped: dict[str, tuple[tuple[int, ...], str]] = {}
    for module_name, module in model.named_modules():
        chosen, why = _default_weights(module_name, module, rules)
        for attr, param in module.named_parameters(recurse=False):
            name = by_id.get(id(param))
            if name is None or name in covered:
                continue  # an alias of a tied weight, already seen
            shape = tuple(param.shape)
            if any(re.search(p, name) for p in rules.exclude):
                skipped.setdefault(name, (shape, "excluded by name"))
            elif attr in chosen or any(re.search(p, name) for p in rules.include):
                covered[name] = (shape, why if attr in chosen else "included by name")
                skipped.pop(name, None)
            elif param.dim() >= 2 or isinstance(module, nn.Embedding):
                reason = why if not chosen else f"{attr} of {type(module).__name__} (not a weight)"
                skipped.setdefault(name, (shape, reason))
    order = {name: i for i, name in enumerate(params)}
    return PrunableReport(
        dict(sorted(covered.items(), key=lambda item: order[item[0]])),
        dict(sorted(skipped.items(), key=lambda item: order[item[0]])),
    )


def _refuse_torch_prune(model: nn.Module) -> None:
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if name.endswith("_orig") and hasattr(module, name[: -len("_orig")] + "_mask"):
                where = f"{module_name}.{name[:-5]}" if module_name else name[:-5]
                raise ValueError(
                    f"{type(model).__name__} carries torch.nn.utils.prune masks ({where}); "
                    "winnow.core.interop.from_torch_prune(model) turns them into a plain model "
                    "and Masks"
                )
