"""The blocks of a transformer (or any stack of repeated layers) and the layers inside them.

:func:`find_blocks` finds the stack a layer-wise method walks: given a path
(``"transformer.h"``) it takes that ``nn.ModuleList``/``nn.Sequential``; otherwise it picks
the largest list of same-type children that hold Linear layers — GPT-2's ``transformer.h``,
OPT's ``model.decoder.layers``, LLaMA's ``model.layers``, BERT's ``encoder.layer``,
``nn.TransformerEncoder.layers``, a sentence-transformers model's encoder — without importing
transformers. :func:`block_layers` lists a block's weight matrices: ``nn.Linear`` and Hugging
Face's ``Conv1D`` (stored ``(in, out)``); embeddings, norms and everything outside the blocks
(the output head) stay dense.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn


def _is_matrix_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 1:
            continue
        children = list(module.children())
        if len({type(c) for c in children}) != 1:
            continue
        if not any(_is_matrix_layer(m) for m in children[0].modules()):
            continue
        if _is_matrix_layer(children[0]):  # a list of bare Linear layers is not a stack of blocks
            continue
        found.append((name, module))
    return found


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, Sequence[nn.Module]]:
    """``(path, blocks)`` of ``model``'s stack of blocks: the module at ``path``, or the list
    of same-type children holding Linear layers with the most parameters.

    Raises ``ValueError`` when ``path`` names nothing, or when no stack is found (then pass
    ``blocks="path.to.list"``).
    """
    if path is not None:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"{type(model).__name__} has no module {path!r} (blocks=...)"
            ) from None
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"blocks={path!r} is a {type(blocks).__name__}, not a list of blocks")
        return path, list(blocks)
    candidates = _candidates(model)
    if not candidates:
        raise ValueError(
            f"no stack of repeated blocks with Linear layers found in {type(model).__name__}; "
            "pass blocks='path.to.ModuleList' (the module holding the transformer layers)"
        )
    name, blocks = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))
    return name, list(blocks)


def block_layers(block: nn.Module, exclude: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The weight-matrix layers of a block by their name inside it (Linear, ``Conv1D``), in
    forward order of registration, except names matching a pattern of ``exclude``."""
    return {
        name: module
        for name, module in block.named_modules()
        if name and _is_matrix_layer(module) and not any(re.search(p, name) for p in exclude)
    }
