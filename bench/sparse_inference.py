"""Sparse inference against dense, measured in one run on this machine (issue 18).

    python bench/sparse_inference.py [layers|models|all] [--threads 2] [--rounds 9]

- ``layers``: 4096×4096 fp32 at batch 1 and 16, densities 50, 30, 10 and 1%, and 2:4 at batch 1;
  1536×384 and 384×1536 (MiniLM's FFN) at batch 1 and 16. For each: dense ``F.linear``, torch
  CSR, torch BSR (its best block), each of winnow's kernels, and what ``winnow.accelerate``
  chooses; times are medians of interleaved rounds (every candidate timed in every round), and
  ratios are dense time / kernel time (above 1 = faster). The bytes the chosen own kernel reads
  (values and indices) over its time give its GB/s, against the copy bandwidth measured first
  (``copy_`` of 256 MB; reading + writing counted).
- ``models``: LeNet-300-100 at 10% and 2% (batch 1 and 60), MiniLM-L6 at 50% and 2:4 (128
  tokens, batch 1), and the Shakespeare GPT-2 of ``bench/shakespeare_lm.py`` at 50% and 2:4
  (generating 64 characters one at a time with the KV cache, batch 1): the accelerated model
  against the dense model and against the same pruned model with torch CSR in every layer.

Writes ``bench/results/sparse-inference-<part>.txt``. Run it with nothing else running.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import winnow  # noqa: E402
from winnow.core.nm import nm_select  # noqa: E402
from winnow.inference import SparseLinear, accelerate, choices  # noqa: E402
from winnow.inference.accelerate import BSR_BLOCKS, interleaved_medians  # noqa: E402

OWN = [f"{f}-{p}" for f in ("csr", "chunk") for p in ("serial", "parallel")]


def medians(functions: dict, rounds: int, seconds: float = 0.02) -> dict[str, float]:
    """Median seconds per call, each function timed once per round, rounds interleaved (the
    tuner's own timing, :func:`winnow.inference.accelerate.interleaved_medians`)."""
    return interleaved_medians(functions, rounds, seconds)


def copy_bandwidth() -> float:
    """GB/s of ``dst.copy_(src)`` on 256 MB (bytes read + written)."""
    src = torch.randn(64 * 1024 * 1024)
    dst = torch.empty_like(src)
    t = medians({"copy": lambda: dst.copy_(src)}, 5, 0.2)["copy"]
    return 2 * src.numel() * 4 / t / 1e9


def weight(out: int, inputs: int, density: float | str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inputs, generator=g)
    if isinstance(density, str):  # an N:M pattern
        return w * nm_select(w.abs(), density, 1)
    return w * (torch.rand(out, inputs, generator=g) < density)


def layer_row(out, inputs, density, batch, rounds, log) -> dict:
    w = weight(out, inputs, density)
    x = torch.randn(batch, inputs)
    pattern = (2, 4) if density == "2:4" else (0, 0)
    layers = {"dense": SparseLinear.from_weight(w, None, "dense")}
    kernels = ["torch-csr", *(f"torch-bsr{b}" for b in BSR_BLOCKS), *OWN]
    if pattern[1]:
        kernels += ["nm-serial", "nm-parallel"]
    for k in kernels:
        layers[k] = SparseLinear.from_weight(w, None, k, pattern)
    linear = torch.nn.Linear(inputs, out, bias=False).requires_grad_(False)
    linear.weight.copy_(w)
    chosen = accelerate(linear, x, budget=0.5)  # the tuner's own pick, timed below with the rest
    layers["chosen"] = chosen
    with torch.no_grad():
        t = medians({k: (lambda layer=layer: layer(x)) for k, layer in layers.items()}, rounds)
    kernel = next(iter(choices(chosen).values())).kernel
    dense = t["dense"]
    bsr = min((k for k in t if k.startswith("torch-bsr")), key=t.get)
    own = min((k for k in t if k in OWN or k.startswith("nm")), key=t.get)
    nbytes = sum(b.numel() * b.element_size() for n, b in layers[own].named_buffers()
                 if n.startswith("packed_"))  # fmt: skip
    label = density if isinstance(density, str) else f"{100 * density:g}%"
    row = {
        "shape": f"{out}x{inputs}", "density": label, "batch": batch,
        "dense_us": 1e6 * dense, "csr": dense / t["torch-csr"], "bsr": dense / t[bsr],
        "own": dense / t[own], "own_name": own, "own_gbs": nbytes / t[own] / 1e9,
        "chosen": dense / t["chosen"], "kernel": kernel,
    }  # fmt: skip
    log(f"{row['shape']:>10} {label:>5} B={batch:<3} dense {row['dense_us']:8.1f} us | torch CSR "
        f"{row['csr']:5.2f}x  {bsr:<12} {row['bsr']:5.2f}x | winnow {own:<15} {row['own']:5.2f}x "
        f"({row['own_gbs']:5.1f} GB/s) | chosen {kernel:<15} {row['chosen']:5.2f}x")  # fmt: skip
    return row


def layers_part(rounds: int, log) -> None:
    bandwidth = copy_bandwidth()
    log(f"copy bandwidth (read + write, 256 MB): {bandwidth:.1f} GB/s")
    w = torch.randn(4096, 4096)
    x = torch.randn(1, 4096)
    with torch.no_grad():
        t = medians({"gemv": lambda: F.linear(x, w)}, rounds)["gemv"]
    log(f"dense 4096x4096 GEMV reads {4096 * 4096 * 4 / t / 1e9:.1f} GB/s of weights")
    log("ratios: dense time / kernel time (above 1 = faster than dense); 'chosen' is what "
        "winnow.accelerate keeps (dense when nothing is faster)")  # fmt: skip
    for batch in (1, 16):
        for density in (0.5, 0.3, 0.1, 0.01):
            layer_row(4096, 4096, density, batch, rounds, log)
    layer_row(4096, 4096, "2:4", 1, rounds, log)
    for shape in ((1536, 384), (384, 1536)):
        for batch in (1, 16):
            for density in (0.5, 0.3, 0.1, 0.01):
                layer_row(*shape, density, batch, rounds, log)


def compare_models(name, model, example, run, rounds, log) -> None:
    """Dense vs accelerated vs all-torch-CSR, timing ``run(m)`` (a whole forward or generation)."""
    fast = accelerate(model, example, budget=0.3)
    csr = accelerate(model, example, kernels=["torch-csr"], margin=float("inf"), budget=0.01)
    with torch.no_grad():
        t = medians({"dense": lambda: run(model), "winnow": lambda: run(fast),
                     "csr": lambda: run(csr)}, rounds, 0.2)  # fmt: skip
    kernels = {}
    for c in choices(fast).values():
        kernels[c.kernel] = kernels.get(c.kernel, 0) + 1
    log(f"{name:<38} dense {1e3 * t['dense']:8.2f} ms | winnow {1e3 * t['winnow']:8.2f} ms "
        f"({t['dense'] / t['winnow']:.2f}x dense, {t['csr'] / t['winnow']:.2f}x torch CSR) | "
        f"torch CSR {1e3 * t['csr']:8.2f} ms | kernels {kernels}")  # fmt: skip


def models_part(rounds: int, log) -> None:
    data = winnow.data.load("fashion-mnist", limit=100)
    for density in (0.1, 0.02):
        model = winnow.models.create_for("lenet300", data, seed=0).eval()
        masks = winnow.prune_at_init(model, "magnitude", density)
        masks.apply(model)
        for batch in (1, 60):
            x = data.x_test[:batch]
            compare_models(f"LeNet-300-100 {100 * density:g}% batch {batch}", model, x,
                           lambda m, x=x: m(x), rounds, log)  # fmt: skip
    import minilm

    bert, tokenizer = minilm.load_bert()
    text = " ".join(verse for _, verse in minilm.kjv_verses()[:200])
    example = dict(tokenizer(text, truncation=True, max_length=128, return_tensors="pt"))
    calibration = minilm.calibration_batches(64, seed=0, max_length=128)
    for target in ({"density": 0.5}, {"pattern": "2:4"}):
        pruned = winnow.oneshot(bert, "wanda", calibration, **target).model.eval()
        label = "50%" if "density" in target else "2:4"
        compare_models(f"MiniLM-L6 {label} (128 tokens, batch 1)", pruned, example,
                       lambda m: m(**example), rounds, log)  # fmt: skip
    import lm_data
    from transformers import GPT2LMHeadModel

    gpt = GPT2LMHeadModel.from_pretrained(HERE / "results" / "shakespeare-gpt2").eval()
    ids = lm_data.encode("ROMEO. But soft, what light through yonder window ")[None, :]
    calibration = lm_data.calibration(32, 128, seed=0)
    step = ids[:, :1]

    def generate(m):
        return m.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=0)

    for target in ({"density": 0.5}, {"pattern": "2:4"}):
        pruned = winnow.oneshot(gpt, "sparsegpt", calibration, **target).model.eval()
        label = "50%" if "density" in target else "2:4"
        compare_models(
            f"Shakespeare GPT-2 {label} (64 tokens)", pruned, step, generate, rounds, log
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("layers", "models", "all"), nargs="?", default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = ("layers", "models") if args.part == "all" else (args.part,)
    for part in parts:
        lines = [f"# .venv/bin/python bench/sparse_inference.py {part} --threads {args.threads} "
                 f"--rounds {args.rounds}",
                 f"# torch {torch.__version__}, {args.threads} threads, {platform.machine()}, "
                 f"{platform.processor() or 'cpu'}; nothing else running"]  # fmt: skip

        def log(line: str, lines=lines) -> None:
            print(line, flush=True)
            lines.append(line)

        for line in lines:
            print(line)
        (layers_part if part == "layers" else models_part)(args.rounds, log)
        (HERE / "results" / f"sparse-inference-{part}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
