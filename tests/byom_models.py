"""Models and data of the "bring your own model" tests (issue 15): small, seeded, offline.

Each case is a model a researcher brings (not winnow's zoo) and data of that model in every
form winnow accepts: a DataLoader, a list of batches, a pair ``(x, y)`` and a DataSplits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from winnow.data import DataSplits

EXAMPLES = 32
BATCH = 8
CLASSES = 4
VOCAB = 50
LENGTH = 12


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convolutions, BatchNorm, a residual add."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """A torchvision-style ResNet: stem, residual stages, adaptive pooling, fc."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TokenTransformer(nn.Module):
    """``nn.TransformerEncoder`` over token ids, with a learned position embedding."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.position_embeddings = nn.Embedding(LENGTH, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, classes)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.position_embeddings(positions)
        return self.head(self.encoder(x).mean(1))


class Recurrent(nn.Module):
    """An LSTM or GRU classifier over token ids (the last step's hidden state)."""

    def __init__(self, kind: str = "lstm", classes: int = CLASSES):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        cell = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = cell(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, classes)

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


class GroupedCat(nn.Module):
    """A grouped and a depthwise convolution whose outputs are concatenated (``torch.cat``)."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.mix = nn.Conv2d(16, 12, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        both = torch.cat([torch.relu(self.depthwise(x)), torch.relu(self.grouped(x))], dim=1)
        return self.fc(torch.flatten(self.pool(torch.relu(self.mix(both))), 1))


def bert():
    transformers = __import__("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=LENGTH, num_labels=CLASSES,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def gpt2():
    transformers = __import__("transformers")
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=LENGTH,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


@dataclass
class Case:
    """A model, how to build it, its per-example input shape, and its examples."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    x: torch.Tensor
    y: torch.Tensor
    dict_batches: bool = False  # Hugging Face: batches are dicts with input_ids and labels
    needs: str | None = None  # an optional package the case needs

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build()

    def data(self, form: str) -> Any:
        """The examples as a DataLoader, a list of batches, a pair or a DataSplits."""
        n = len(self.x)
        if form == "pair":
            return self.x, self.y
        if form == "splits":
            half = n // 2
            return DataSplits(
                self.name, self.x, self.y, self.x[:half], self.y[:half], self.x[half:],
                self.y[half:], CLASSES, tuple(self.input_shape),
            )  # fmt: skip
        if self.dict_batches:
            examples = [{"input_ids": self.x[i], "labels": self.y[i]} for i in range(n)]
            if form == "loader":
                return DataLoader(examples, batch_size=BATCH, shuffle=False)
            return [
                {"input_ids": self.x[i : i + BATCH], "labels": self.y[i : i + BATCH]}
                for i in range(0, n, BATCH)
            ]
        if form == "loader":
            return DataLoader(TensorDataset(self.x, self.y), batch_size=BATCH, shuffle=False)
        return [(self.x[i : i + BATCH], self.y[i : i + BATCH]) for i in range(0, n, BATCH)]


def _images(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(EXAMPLES) % CLASSES
    x = torch.randn(EXAMPLES, 3, 16, 16, generator=gen) + y.view(-1, 1, 1, 1).float()
    return x, y


def _tokens(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(EXAMPLES) % CLASSES
    x = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=gen)
    x[:, 0] = y  # the class is readable from the first token
    return x, y


def cases() -> list[Case]:
    images, tokens = _images(0), _tokens(1)
    return [
        Case("resnet", TinyResNet, (3, 16, 16), *images),
        Case("transformer", TokenTransformer, (LENGTH,), *tokens),
        Case("lstm", lambda: Recurrent("lstm"), (LENGTH,), *tokens),
        Case("gru", lambda: Recurrent("gru"), (LENGTH,), *tokens),
        Case("grouped-cat", GroupedCat, (3, 16, 16), *images),
        Case("bert", bert, (LENGTH,), *tokens, dict_batches=True, needs="transformers"),
        Case(
            "gpt2", gpt2, (LENGTH,), tokens[0], tokens[0], dict_batches=True, needs="transformers"
        ),
    ]


CASES = {case.name: case for case in cases()}
FORMS = ("loader", "list", "pair", "splits")
