"""Sparse storage: index bits per non-zero of every format, and checkpoint sizes vs the bound.

Hoefler et al. 2021, §2.2: the index overhead of storing ``m`` non-zeros of ``n`` entries
depends on the format and the sparsity; the lower bound is ``log2 C(n, m)`` bits. Measured in
one run, on seeded random masks (uniform positions) with Gaussian values:

1. the survey's figure: index bits per non-zero vs sparsity for every format, with the bound,
   on a 1024x1024 matrix -> ``bench/results/storage-index-bits.{md,png}``;
2. a 4096x4096 fp32 matrix at densities 10% and 1%: bytes of ``torch.save`` (dense), torch's
   ``to_sparse_csr`` saved, scipy's compressed ``save_npz``, zstd -19 of a CSR file with 16-bit
   column indices, and ``winnow.save_sparse`` (auto; with value compression), each over the
   bound ``log2 C(n, m) + 32 m`` bits;
3. value compression (zstd of the words vs of their byte planes) on Gaussian values of std 1
   and of std 0.05 (the scale of trained weights; no model is trained here), fp32 and bf16;
4. encode / decode throughput of every format on the 4096x4096 matrix at density 10%
   (MB of the dense fp32 tensor per second; the machine may be loaded: see the conditions).

    python bench/storage.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import winnow
from winnow.formats import (
    FORMATS,
    SparseView,
    decode,
    encode,
    index_bits_per_nonzero,
    log2_binomial,
    save_sparse,
)
from winnow.formats import values as value_codecs

RESULTS = Path(__file__).parent / "results"
SPARSITIES = (0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


def random_sparse(rows: int, cols: int, density: float, seed: int, std: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * std
    x[torch.rand(rows, cols, generator=gen) >= density] = 0
    return x


def conditions() -> str:
    import zstandard

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"winnow {winnow.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
        f"zstandard {zstandard.__version__}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"load average {load}; every matrix seeded"
    )


# -- 1. the survey's figure ----------------------------------------------------------------------
def index_bits_figure(side: int) -> str:
    formats = [f for f in FORMATS if f != "dense"]
    rows = []
    for i, sparsity in enumerate(SPARSITIES):
        view = SparseView.of(random_sparse(side, side, 1 - sparsity, seed=i))
        per_nz = index_bits_per_nonzero(view)
        bound = log2_binomial(view.n, view.m) / view.m
        width = FORMATS["padded-delta"].encode(view)[0]["width"]
        rows.append((sparsity, view.m, bound, per_nz, width))
    header = "| sparsity | bound | " + " | ".join(formats) + " | best fixed / bound | pad b |"
    lines = [
        f"Index bits per non-zero, {side}x{side} fp32 matrix, uniform random positions "
        "(bound: log2 C(n, m) / m; padded-delta with its best width b):",
        "",
        header,
        "|" + "---|" * (len(formats) + 4),
    ]
    for sparsity, _, bound, per_nz, width in rows:
        fixed = min(v for k, v in per_nz.items() if k != "entropy")
        cells = " | ".join(f"{per_nz[f]:.2f}" for f in formats)
        lines.append(f"| {sparsity:.1%} | {bound:.2f} | {cells} | {fixed / bound:.2f} | {width} |")
    ratios = [per_nz["entropy"] / bound for _, _, bound, per_nz, _ in rows]
    fixed_ratios = [
        min(v for k, v in per_nz.items() if k != "entropy") / bound
        for _, _, bound, per_nz, _ in rows
    ]
    lines += [
        "",
        f"entropy / bound: {min(ratios):.4f} .. {max(ratios):.4f}; "
        f"best fixed format / bound: {min(fixed_ratios):.2f} .. {max(fixed_ratios):.2f}",
    ]
    table = "\n".join(lines)
    _plot(rows, formats, side)
    (RESULTS / "storage-index-bits.md").write_text(table + "\n")
    return table


def _plot(rows, formats, side) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in formats:
        style = ":" if name == "csc" else "-"  # csc equals csr on a square matrix
        ax.plot(x, [r[3][name] for r in rows], style, marker="o", ms=3, label=name)
    ax.plot(x, [r[2] for r in rows], "k--", lw=2, label="bound log2 C(n,m) / m")
    ax.set_xscale("logit")  # spreads out both ends: 10% .. 99.9%
    ax.set_xticks(x, [f"{100 * v:g}" for v in x], rotation=45)
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("index bits per non-zero")
    ax.set_title(f"Index overhead per format, {side}x{side} (Hoefler et al. 2021, §2.2)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "storage-index-bits.png", dpi=120)
    plt.close(fig)


# -- 2. checkpoint sizes -------------------------------------------------------------------------
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _torch_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def _csr16_zstd(x: torch.Tensor, level: int) -> int:
    import zstandard

    csr = x.to_sparse_csr()
    assert x.shape[1] <= 1 << 16
    raw = b"".join(
        [
            csr.crow_indices().to(torch.int32).numpy().tobytes(),
            csr.col_indices().numpy().astype(np.uint16).tobytes(),
            csr.values().numpy().tobytes(),
        ]
    )
    return len(zstandard.ZstdCompressor(level=level).compress(raw))


def _scipy_npz(x: torch.Tensor) -> int | None:
    try:
        import scipy.sparse
    except ImportError:
        return None
    buffer = io.BytesIO()
    scipy.sparse.save_npz(buffer, scipy.sparse.csr_matrix(x.numpy()), compressed=True)
    return buffer.tell()


def _winnow_file(x: torch.Tensor, **options) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.sparse"
        info = save_sparse({"w": x}, path, **options)[0]
        return path.stat().st_size, info.format + ("+" + info.codec if info.codec != "raw" else "")


def checkpoint_sizes(side: int) -> str:
    lines = [
        f"{side}x{side} fp32, Gaussian values (std 1) at uniform random positions; "
        "x bound = bytes / ((log2 C(n, m) + 32 m) / 8):",
        "",
        "| density | bound | method | bytes | x bound |",
        "|---|---|---|---|---|",
    ]
    for seed, density in enumerate((0.1, 0.01)):
        x = random_sparse(side, side, density, seed=100 + seed)
        n, m = x.numel(), int((x != 0).sum())
        bound = (log2_binomial(n, m) + 32 * m) / 8
        measures = [
            ("torch.save dense", _torch_bytes(x)),
            ("torch.save to_sparse_csr", _torch_bytes(x.to_sparse_csr())),
        ]
        npz = _scipy_npz(x)
        if npz is not None:
            measures.append(("scipy save_npz(compressed=True)", npz))
        measures.append(("zstd -19 of CSR (int32 rows, uint16 cols, fp32)", _csr16_zstd(x, 19)))
        size, fmt = _winnow_file(x)
        measures.append((f"winnow save_sparse auto ({fmt})", size))
        size, fmt = _winnow_file(x, compress_values=True)
        measures.append((f"winnow save_sparse auto, compress_values ({fmt})", size))
        size, fmt = _winnow_file(x, compress_values=True, level=19)
        measures.append((f"winnow save_sparse auto, compress_values level 19 ({fmt})", size))
        for name, size in measures:
            lines.append(
                f"| {density:.0%} | {bound / 1e6:.2f} MB | {name} | {size / 1e6:.3f} MB "
                f"| {size / bound:.3f} |"
            )
    return "\n".join(lines)


# -- 3. value compression ------------------------------------------------------------------------
def value_compression(count: int) -> str:
    lines = [
        f"{count:,} non-zero values; bytes of the value stream (zstd level "
        f"{value_codecs.DEFAULT_LEVEL}) as a fraction of raw:",
        "",
        "| values | dtype | raw | zstd | zstd-planes |",
        "|---|---|---|---|---|",
    ]
    gen = torch.Generator().manual_seed(7)
    for label, std in (("Gaussian std 1", 1.0), ("Gaussian std 0.05 (trained-like)", 0.05)):
        values = torch.randn(count, generator=gen) * std
        for dtype in (torch.float32, torch.bfloat16):
            raw = values.to(dtype).view(torch.uint8).numpy()
            size = values.to(dtype).element_size()
            cells = []
            for codec in ("zstd", "zstd-planes"):
                _, stream = value_codecs.compress(raw, size, codecs=(codec,))
                cells.append(f"{stream.size / raw.size:.3f}")
            dtype_name = str(dtype).replace("torch.", "")
            lines.append(f"| {label} | {dtype_name} | {raw.size:,} | {' | '.join(cells)} |")
    return "\n".join(lines)


# -- 4. throughput -------------------------------------------------------------------------------
def throughput(side: int, repeat: int) -> str:
    x = random_sparse(side, side, 0.1, seed=200)
    dense_mb = x.numel() * 4 / 1e6
    lines = [
        f"{side}x{side} fp32 at density 10% ({dense_mb:.0f} MB dense); median of {repeat}; "
        "encode includes finding the non-zeros:",
        "",
        "| format | bytes | encode MB/s | decode MB/s |",
        "|---|---|---|---|",
    ]
    for name in FORMATS:
        enc, dec = [], []
        for _ in range(repeat):
            start = time.perf_counter()
            encoded = encode(x, name)
            enc.append(time.perf_counter() - start)
            start = time.perf_counter()
            back = decode(encoded)
            dec.append(time.perf_counter() - start)
        assert torch.equal(back, x)
        lines.append(
            f"| {name} | {encoded.nbytes:,} | {dense_mb / statistics.median(enc):.0f} "
            f"| {dense_mb / statistics.median(dec):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller matrices (a smoke run)")
    args = parser.parse_args()
    side = 1024 if args.quick else 4096
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(conditions())
    started = time.perf_counter()
    sections = [
        (
            "1. index bits per non-zero (the survey's figure)",
            index_bits_figure(256 if args.quick else 1024),
        ),
        ("2. checkpoint bytes vs the bound", checkpoint_sizes(side)),
        ("3. value compression", value_compression(100_000 if args.quick else 1_677_722)),
        ("4. throughput (machine may be loaded)", throughput(side, 3)),
    ]
    for title, text in sections:
        print(f"\n## {title}\n\n{text}")
    print(f"\nwritten: {RESULTS / 'storage-index-bits.md'}, {RESULTS / 'storage-index-bits.png'}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
