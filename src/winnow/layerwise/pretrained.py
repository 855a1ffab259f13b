"""Pretrained models and calibration data from files, offline (Hugging Face optional).

:func:`load_pretrained` builds the class a Hugging Face model directory names in its
``config.json`` (``architectures``) with ``from_pretrained(..., local_files_only=True)``: nothing
is downloaded. :func:`calibration_from_file` draws calibration sequences from a safetensors file
of token ids or from a text file tokenised by the directory's tokenizer. transformers is
imported only here, when called (``pip install 'winnow[hf]'``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "loading a Hugging Face model directory needs transformers: pip install 'winnow[hf]'"
        ) from None
    return transformers


def load_pretrained(directory: str | os.PathLike) -> nn.Module:
    """The Hugging Face model saved in ``directory`` (its ``config.json`` names the class), in
    eval mode. ``ValueError`` when the directory holds no such model."""
    directory = Path(directory)
    config = directory / "config.json"
    if not config.is_file():
        raise ValueError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config}: not readable JSON ({err})") from None
    transformers = _transformers()
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(directory, local_files_only=True).eval()


def calibration_from_file(
    path: str | os.PathLike,
    samples: int = 128,
    length: int = 128,
    seed: int = 0,
    tokenizer_directory: str | os.PathLike | None = None,
) -> Tensor:
    """``samples`` sequences of ``length`` token ids, ``(samples, length)``, drawn with ``seed``.

    ``path`` is a safetensors file holding ``input_ids`` (``(N, L)``: rows are drawn, cut to
    ``length``; or ``(T,)``: a token stream cut into windows), or a text file tokenised with the
    tokenizer of ``tokenizer_directory`` (random windows of the token stream, as SparseGPT
    samples its C4 calibration). ``ValueError`` when there are too few tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no calibration file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        ids = load_file(str(path)).get("input_ids")
        if ids is None:
            raise ValueError(f"{path} holds no 'input_ids' tensor")
    else:
        if tokenizer_directory is None:
            raise ValueError("a text calibration file needs the model directory's tokenizer")
        tokenizer = _transformers().AutoTokenizer.from_pretrained(
            tokenizer_directory, local_files_only=True
        )
        ids = torch.tensor(tokenizer(path.read_text(encoding="utf-8"))["input_ids"])
    generator = torch.Generator().manual_seed(seed)
    if ids.dim() == 2:
        if ids.shape[1] < length:
            raise ValueError(f"{path}: sequences of {ids.shape[1]} tokens, asked {length}")
        rows = torch.randperm(len(ids), generator=generator)[:samples]
        return ids[rows, :length].long()
    if ids.numel() < length + 1:
        raise ValueError(f"{path}: {ids.numel()} tokens, fewer than one sequence of {length}")
    starts = torch.randint(0, ids.numel() - length, (samples,), generator=generator)
    return torch.stack([ids[s : s + length] for s in starts.tolist()]).long()
