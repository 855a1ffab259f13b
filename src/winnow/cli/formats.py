"""``winnow pack``, ``winnow unpack`` and ``winnow inspect``: sparse checkpoints from the shell.

winnow pack weights.safetensors --out model.sparse [--format auto] [--compress-values]
winnow pack results/lottery/<run>/ --masks masks.safetensors --out model.sparse
winnow unpack model.sparse --out weights.safetensors
winnow inspect model.sparse            (or a plain safetensors state_dict: what pack would do)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from torch import Tensor

from winnow.cli.command import Command
from winnow.core.masks import Masks
from winnow.formats import values as value_codecs
from winnow.formats.checkpoint import (
    MAX_TOTAL_BYTES,
    TensorInfo,
    encode_state,
    inspect_sparse,
    load_sparse,
    save_sparse,
)
from winnow.formats.encodings import DTYPES, FORMATS, bound_bits
from winnow.io import atomic_write_bytes, load_tensors, sniff

RUN_WEIGHTS = (
    "final.safetensors",
    "pruned.safetensors",
    "weights.safetensors",
    "model.safetensors",
)
"""Weight files looked for, in this order, when ``pack`` is given a run directory."""


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors state_dict, a winnow tensor file, a sparse checkpoint or a run.

    A directory is a winnow run: its first file among :data:`RUN_WEIGHTS` is read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.is_dir():
        found = [path / name for name in RUN_WEIGHTS if (path / name).is_file()]
        if not found:
            present = sorted(p.name for p in path.glob("*.safetensors"))
            raise FileNotFoundError(
                f"{path}: no {' / '.join(RUN_WEIGHTS)} in this run directory "
                f"(safetensors files here: {', '.join(present) or 'none'}); name the file"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    kind = sniff(path)
    if kind == "winnow.sparse":
        return load_sparse(path)
    if kind == "winnow.tensors":
        return load_tensors(path)
    if kind == "winnow.masks":
        raise ValueError(f"{path} is a winnow mask file, not weights (pass it with --masks)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors state_dict ({err})") from None


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.2f} GB"


def info_table(infos: list[TensorInfo]) -> str:
    """A table per tensor: shape, format, density, bytes, index bits per non-zero, x bound."""
    rows = [("tensor", "shape", "dtype", "format", "density", "bytes", "idx bits/nz", "x bound")]
    for info in infos:
        ratio = info.ratio_to_bound
        rows.append(
            (
                info.name,
                "x".join(map(str, info.shape)) or "scalar",
                info.dtype,
                info.format + ("+" + info.codec if info.codec != "raw" else ""),
                f"{info.density:.2%}",
                f"{info.nbytes:,}",
                f"{info.index_bits_per_nonzero:.2f}" if info.nnz else "-",
                f"{ratio:.3f}" if math.isfinite(ratio) else "-",
            )
        )
    total = sum(i.nbytes for i in infos)
    bound = sum(bound_bits(i.numel, i.nnz, DTYPES[i.dtype]) for i in infos) / 8
    nnz, numel = sum(i.nnz for i in infos), sum(i.numel for i in infos)
    rows.append(
        (
            "total",
            f"{len(infos)} tensors",
            "",
            "",
            f"{nnz / numel:.2%}" if numel else "-",
            f"{total:,}",
            "",
            f"{total / bound:.3f}" if bound else "-",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row[:4], widths[:4], strict=True)]
        cells += [c.rjust(w) for c, w in zip(row[4:], widths[4:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if i in (0, len(rows) - 2):
            lines.append("  ".join("-" * w for w in widths))
    lines.append(
        f"{_human(total)} stored; bound log2 C(n, m) + value bits = {_human(bound)} "
        "(x bound: stored / bound)"
    )
    return "\n".join(lines)


def _cmd_pack(args: argparse.Namespace) -> None:
    state = read_state_dict(args.input)
    if args.masks:
        masks = Masks.load(args.masks)
        for name, mask in masks.items():
            if name not in state or state[name].shape != mask.shape:
                raise ValueError(f"mask {name!r} matches no tensor of that shape in {args.input}")
            state[name] = state[name].masked_fill(~mask, 0)
    infos = save_sparse(
        state, args.out, format=args.format, compress_values=args.compress_values, level=args.level
    )
    print(info_table(infos))
    print(f"written to {args.out} ({_human(args.out.stat().st_size)} on disk)")


def _cmd_unpack(args: argparse.Namespace) -> None:
    from safetensors.torch import save

    state = load_sparse(args.input, max_total_bytes=args.max_bytes)
    data = save({k: v.contiguous() for k, v in state.items()})
    atomic_write_bytes(args.out, data)
    print(f"{len(state)} tensors written to {args.out} ({_human(len(data))})")


def _cmd_inspect(args: argparse.Namespace) -> None:
    kind = sniff(args.input)
    if kind == "winnow.sparse":
        print(info_table(inspect_sparse(args.input)))
        return
    if kind == "winnow.masks":
        masks = Masks.load(args.input)
        print(f"{args.input} is a winnow mask file: {len(masks)} masks")
        print(masks.summary())
        return
    state = read_state_dict(args.input)
    _, _, infos = encode_state(
        state, args.format, compress_values=args.compress_values, level=args.level
    )
    print(f"{args.input} is not a sparse checkpoint; `winnow pack` would write:")
    print(info_table(infos))


def _encoding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", choices=("auto", *FORMATS), default="auto", help="(default: auto)"
    )
    parser.add_argument(
        "--compress-values", action="store_true", help="zstd the values (or byte planes)"
    )
    parser.add_argument(
        "--level", type=int, default=value_codecs.DEFAULT_LEVEL,
        help=f"zstd level (default: {value_codecs.DEFAULT_LEVEL})",
    )  # fmt: skip


def _pack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="a safetensors state_dict, or a run directory")
    parser.add_argument("--out", type=Path, required=True, help="the sparse checkpoint to write")
    parser.add_argument(
        "--masks", type=Path, help="zero what these masks prune before packing (default: none)"
    )
    _encoding_options(parser)


def _unpack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="a sparse checkpoint (winnow pack)")
    parser.add_argument("--out", type=Path, required=True, help="the safetensors file to write")
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=MAX_TOTAL_BYTES,
        help="refuse a file whose tensors would decode to more bytes than this "
        f"(default: half of this machine's memory, {MAX_TOTAL_BYTES:,})",
    )


def _inspect_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="a sparse checkpoint, mask file or state_dict")
    _encoding_options(parser)


COMMANDS = (
    Command("pack", "write a state_dict as a sparse checkpoint", _pack_options, _cmd_pack),
    Command(
        "unpack",
        "a sparse checkpoint back to a safetensors state_dict",
        _unpack_options,
        _cmd_unpack,
    ),  # fmt: skip
    Command(
        "inspect",
        "per tensor: format, density, bytes, x bound (or a mask file's summary)",
        _inspect_options,
        _cmd_inspect,
    ),  # fmt: skip
)
