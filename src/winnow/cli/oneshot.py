"""``winnow oneshot``: a pretrained Hugging Face model pruned layer by layer, from the shell.

    winnow oneshot MODEL_DIR --method sparsegpt --density 0.5 --calibration ids.safetensors \\
        --out model.sparse [--save-pretrained pruned/]
    winnow oneshot MODEL_DIR --method wanda --pattern 2:4 --calibration text.txt --out m.sparse
"""

from __future__ import annotations

import argparse
from pathlib import Path

from winnow.cli.command import Command
from winnow.cli.commands import DEVICE_HELP
from winnow.cli.options import fraction_argument


def _options(parser: argparse.ArgumentParser) -> None:
    from winnow.layerwise.solvers import SOLVERS

    parser.add_argument("model", type=Path, help="a Hugging Face model directory (config.json)")
    parser.add_argument("--method", required=True, choices=sorted(SOLVERS), help="the layer solver")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--density", type=fraction_argument, metavar="FRACTION",
        help="fraction of each layer's weights kept: 0.5 or 50%% (default: none; give this "
        "or --pattern)",
    )  # fmt: skip
    target.add_argument(
        "--pattern", help="an N:M pattern along the inputs, e.g. 2:4 (default: none)"
    )
    parser.add_argument(
        "--calibration", type=Path, required=True,
        help="a safetensors file of input_ids, or a text file for the model's tokenizer",
    )  # fmt: skip
    parser.add_argument(
        "--samples", type=int, default=128, help="calibration sequences (default: 128)"
    )
    parser.add_argument(
        "--length", type=int, default=128, help="tokens per calibration sequence (default: 128)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default: 0)")
    parser.add_argument(
        "--blocks", help="path of the stack of blocks (default: found in the model)"
    )
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument(
        "--out", type=Path, required=True, help="the sparse checkpoint to write (winnow pack)"
    )
    parser.add_argument("--masks", type=Path, help="also write the masks here (default: not)")
    parser.add_argument(
        "--save-pretrained", type=Path, metavar="DIR",
        help="also write a directory that from_pretrained loads (default: not)",
    )  # fmt: skip


def _run(args: argparse.Namespace) -> None:
    from winnow.formats import save_sparse
    from winnow.layerwise import oneshot
    from winnow.layerwise.pretrained import calibration_from_file, load_pretrained

    model = load_pretrained(args.model)
    calibration = calibration_from_file(
        args.calibration, args.samples, args.length, args.seed, tokenizer_directory=args.model
    )
    result = oneshot(
        model, args.method, calibration, density=args.density, pattern=args.pattern,
        blocks=args.blocks, device=args.device, inplace=True,
    )  # fmt: skip
    print(result.table())
    print(
        f"{len(result.layers)} layers pruned to {result.masks.density():.2%} with "
        f"{args.method} on {len(calibration)} x {calibration.shape[1]} calibration tokens in "
        f"{result.seconds:.1f} s"
    )
    save_sparse(result.model, args.out)
    print(f"written to {args.out}")
    if args.masks:
        result.masks.save(args.masks)
        print(f"masks written to {args.masks}")
    if args.save_pretrained:
        result.model.save_pretrained(args.save_pretrained)
        print(f"from_pretrained directory written to {args.save_pretrained}")


COMMANDS = (
    Command(
        "oneshot",
        "prune a pretrained Hugging Face model layer by layer (SparseGPT, Wanda, magnitude)",
        _options,
        _run,
        timed=True,
    ),
)
