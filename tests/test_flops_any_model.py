"""FLOPs of any model: recurrent layers, attention, grouped convolutions, Hugging Face models,
cross-checked against torch.utils.flop_counter.FlopCounterMode; nothing uncounted is silent."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from winnow import models
from winnow.structured import analyse, count, count_analysis

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = 12


def reference(model: nn.Module, x, per_module: bool = False):
    """FlopCounterMode's plain count / 2 (MACs), with every kernel it can see: attention on the
    math backend (bmm), recurrent layers without oneDNN (addmm), no fused attention path."""
    fast = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # oneDNN's TF32 note
            with (
                torch.no_grad(),
                torch.backends.mkldnn.flags(enabled=False),
                sdpa_kernel(SDPBackend.MATH),
                FlopCounterMode(display=False) as counter,
            ):
                model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    if not per_module:
        return counter.get_total_flops() // 2
    return {k: sum(v.values()) // 2 for k, v in counter.get_flop_counts().items()}


def tokens(length: int = TOKENS) -> torch.Tensor:
    return torch.zeros(1, length, dtype=torch.long)


class RecurrentClassifier(nn.Module):
    """Embedding -> recurrent layer -> Linear head on the last step."""

    def __init__(self, rnn: type[nn.RNNBase], **options) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.rnn = rnn(16, 32, batch_first=True, **options)
        directions = 2 if options.get("bidirectional") else 1
        self.head = nn.Linear(directions * (options.get("proj_size") or 32), 4)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out[:, -1])


class UntraceableRecurrent(RecurrentClassifier):
    """The same, with data-dependent control flow (counted with hooks) and a tuple output."""

    def forward(self, x):
        h = self.emb(x)
        if h.sum() > 1e9:
            h = h * 0
        out, state = self.rnn(h)
        return self.head(out[:, -1]), state


def recurrent_macs(gates, inputs, hidden, layers=1, directions=1, proj=0, steps=TOKENS):
    """gates x hidden x (layer input + state) per step, direction and layer (+ projection)."""
    state = proj or hidden
    total = 0
    for layer in range(layers):
        width = inputs if layer == 0 else directions * state
        total += directions * (gates * hidden * (width + state) + proj * hidden)
    return steps * total


RECURRENT = [
    (nn.LSTM, {}, recurrent_macs(4, 16, 32)),
    (nn.GRU, {}, recurrent_macs(3, 16, 32)),
    (nn.RNN, {}, recurrent_macs(1, 16, 32)),
    (nn.GRU, {"num_layers": 2, "bidirectional": True}, recurrent_macs(3, 16, 32, 2, 2)),
    (
        nn.LSTM,
        {"num_layers": 2, "bidirectional": True, "proj_size": 8},
        recurrent_macs(4, 16, 32, 2, 2, 8),
    ),
]


@pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")
@pytest.mark.parametrize("rnn, options, expected", RECURRENT)
def test_recurrent_classifier_counts_the_recurrence(rnn, options, expected):
    model = RecurrentClassifier(rnn, **options)
    counts = count(model, (TOKENS,))
    head = model.head.in_features * 4
    assert counts.layer_macs() == {"rnn": expected, "head": head}
    assert counts.macs == expected + head == reference(model, tokens())
    assert counts.uncounted == ()
    assert counts.params == sum(p.numel() for p in model.parameters())
    # the formula has elementwise operations too (LSTM, one layer: 12 x (4h + 8h + 9h))
    if rnn is nn.LSTM and not options:
        assert counts.elementwise == TOKENS * 21 * 32 + 4


def test_lstm_and_gru_classifiers_the_issue_reported():
    """Issue 15: the LSTM classifier counted 128 MACs, only its head."""
    lstm = count(RecurrentClassifier(nn.LSTM), (TOKENS,))
    assert lstm.macs == 12 * 4 * 32 * (16 + 32) + 128 == 73_856
    gru = count(RecurrentClassifier(nn.GRU), (TOKENS,))
    assert gru.macs == 12 * 3 * 32 * (16 + 32) + 128 == 55_424


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_untraceable_recurrent_model_with_tuple_output(rnn):
    model = UntraceableRecurrent(rnn)
    counts = count(model, (TOKENS,))  # counted with hooks: the forward has an `if`
    assert counts.layer_macs() == {"rnn": recurrent_macs(_gates(rnn), 16, 32), "head": 128}
    assert counts.macs == reference(model, tokens())
    assert any("functional" in item and "UntraceableRecurrent" in item for item in counts.uncounted)


def _gates(rnn):
    return {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[rnn]


def test_recurrent_cells():
    class Cells(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.gru = nn.LSTMCell(8, 16), nn.GRUCell(16, 16)

        def forward(self, x):
            h, _ = self.lstm(x)
            return self.gru(h)

    model = Cells()
    counts = count(model, (8,))
    assert counts.layer_macs() == {"lstm": 4 * 16 * (8 + 16), "gru": 3 * 16 * (16 + 16)}
    assert counts.macs == reference(model, torch.zeros(1, 8))


class TransformerClassifier(nn.Module):
    def __init__(self, dim=32, heads=2, ffn=64, layers=2, classes=3) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


def test_transformer_encoder_classifier():
    length, dim, ffn = 16, 32, 64
    model = TransformerClassifier(dim=dim, ffn=ffn)
    counts = count(model, (length,))
    attention = 4 * length * dim * dim + 2 * length * length * dim  # QKV + out, QK^T + AV
    feed_forward = 2 * length * dim * ffn
    assert counts.macs == 2 * (attention + feed_forward) + dim * 3 == 295_008
    assert counts.macs == reference(model, tokens(length))
    by_layer = counts.layer_macs()
    for i in range(2):
        assert by_layer[f"encoder.layers.{i}.self_attn"] == attention
        assert by_layer[f"encoder.layers.{i}.linear1"] == length * dim * ffn
    engines = {layer.name: layer.engine for layer in counts.layers}
    assert engines["encoder.layers.0.self_attn"] == "FlopCounterMode"
    assert engines["encoder.layers.0.linear1"] == "formula"
    # what neither engine counts is named: the LayerNorms and the layer's own add and ReLU
    assert any("norm1" in item and "LayerNorm" in item for item in counts.uncounted)
    assert any(
        item.startswith("encoder.layers.0 (TransformerEncoderLayer): functional")
        for item in counts.uncounted
    )
    assert not any("MACs not counted" in item for item in counts.uncounted)
    assert counts.params == sum(p.numel() for p in model.parameters())


def test_counting_restores_the_attention_fast_path_and_modes():
    model = TransformerClassifier().train()
    before = torch.backends.mha.get_fastpath_enabled()
    count(model, (8,))
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert all(m.training for m in model.modules())


class SDPAModel(nn.Module):
    """Functional attention in a traced graph, and a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        b, _ = self.mha(x, x, x)
        return {"logits": a.squeeze(1) + b}


def test_functional_attention_and_multihead_attention_in_a_traced_graph():
    length, dim = 10, 16
    model = SDPAModel()
    counts = count(model, (length, dim))
    sdpa = 2 * length * length * dim
    assert counts.layer_macs() == {
        "qkv": length * dim * 3 * dim,
        "scaled_dot_product_attention": sdpa,
        "mha": 4 * length * dim * dim + sdpa,
    }
    assert counts.macs == reference(model, torch.zeros(1, length, dim))
    assert counts.uncounted == ()
    # costed from shapes alone, the attention is named, not dropped (the MHA returns a tuple)
    shapes_only = count_analysis(analyse(model, (length, dim)))
    assert shapes_only.macs == length * dim * 3 * dim
    assert "mha (MultiheadAttention)" in shapes_only.uncounted
    assert any(item.startswith("scaled_dot_product_attention") for item in shapes_only.uncounted)


class GroupedCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([self.depthwise(x), self.grouped(x)], dim=1)
        return self.head(torch.flatten(self.pool(x), 1))


def test_grouped_and_depthwise_convolutions_with_a_concatenation():
    model = GroupedCat()
    counts = count(model, (3, 8, 8))
    positions = 8 * 8
    expected = {
        "stem": 8 * positions * 3 * 9,
        "depthwise": 8 * positions * 1 * 9,
        "grouped": 8 * positions * 4 * 1,
        "head": 16 * 5,
    }
    assert counts.layer_macs() == expected
    assert counts.macs == sum(expected.values()) == reference(model, torch.zeros(1, 3, 8, 8))
    assert any(layer.kind == "cat" and layer.macs == 0 for layer in counts.layers)
    assert counts.uncounted == ()


ZOO = [
    ("lenet5", {"input_size": 28}, (1, 28, 28)),
    ("resnet20", {"in_channels": 3, "input_size": 32}, (3, 32, 32)),
    ("vgg11", {"input_size": 28}, (1, 28, 28)),
]


@pytest.mark.parametrize("name, options, shape", ZOO)
def test_hand_formulas_equal_flop_counter_mode_on_the_zoo(name, options, shape):
    model = models.create(name, **options)
    counts = count(model, shape)
    assert all(layer.engine == "formula" for layer in counts.layers)
    measured = reference(model, torch.zeros(1, *shape), per_module=True)
    root = type(model).__name__
    assert counts.macs == measured["Global"]
    layers = {
        name: measured[f"{root}.{name}"]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }
    assert counts.layer_macs() == layers
    assert counts.uncounted == ()


def test_what_cannot_be_counted_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.softmax = nn.Softmax(-1)

        def forward(self, x):
            y = self.lin(x)
            return torch.cdist(y, y), self.softmax(y)

    counts = count(Odd(), (5, 8))
    assert counts.macs == 5 * 8 * 8  # the Linear; cdist's products have no formula
    cdist = [item for item in counts.uncounted if "cdist" in item]
    assert cdist and "MACs not counted" in cdist[0]
    assert any(item.startswith("softmax (Softmax") for item in counts.uncounted)


def test_untraceable_module_with_unknown_kernel_is_named():
    class Hidden(nn.Module):
        def forward(self, x):
            if x.sum() > 1e9:
                x = x * 0
            return torch.cdist(x, x)

    counts = count(Hidden(), (5, 8))
    assert counts.macs == 0
    assert any("aten._cdist_forward" in item for item in counts.uncounted)


def test_hugging_face_style_output_object():
    class Output(dict):
        def __getattr__(self, key):
            return self[key]

    class WithOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(50, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.emb(x)
            if h.sum() > 1e9:
                h = h * 0
            return Output(logits=self.head(h), hidden_states=(h,))

    counts = count(WithOutput(), (6,))
    assert counts.macs == 6 * 8 * 2


def _hf_check(model, length=16):
    counts = count(model, (length,))
    expected = reference(model, tokens(length))
    assert abs(counts.macs - expected) <= 0.03 * expected
    assert not any("MACs not counted" in item for item in counts.uncounted)
    # every projection is counted by formula, the attention products by FlopCounterMode
    projections = {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    }
    assert projections <= set(counts.layer_macs())
    return counts


def test_bert_for_sequence_classification():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = transformers.BertForSequenceClassification(config)
    counts = _hf_check(model)
    length, dim = 16, 32
    per_layer = 4 * length * dim * dim + 2 * length * length * dim + 2 * length * dim * 64
    assert counts.macs == 2 * per_layer + dim * dim + dim * 2 == 296_000
    attention = counts.layer_macs()["bert.encoder.layer.0.attention.self"]
    assert attention == 2 * length * length * dim  # QK^T + AV, measured


def test_gpt2_lm_head_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    counts = _hf_check(model)
    length, dim = 16, 32
    per_layer = 4 * length * dim * dim + 2 * length * length * dim + 2 * length * dim * 4 * dim
    assert counts.macs == 2 * per_layer + length * dim * 100 == 477_184
