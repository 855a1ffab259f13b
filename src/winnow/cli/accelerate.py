"""``winnow accelerate``: time every kernel on each pruned layer and keep the fastest.

    winnow accelerate pruned/ --batch 1 --seq-len 128 --threads 2 --out fast.sparse
    winnow accelerate run_dir --arch lenet300 --data fashion-mnist --batch 60 --out fast.sparse

A Hugging Face model directory (after ``winnow oneshot --save-pretrained``) is timed on
random token ids of ``--batch`` × ``--seq-len``; weights of a model of the zoo (a run
directory, a sparse checkpoint or a safetensors state_dict, with ``--arch`` and ``--data``) on
the first ``--batch`` examples of the data's test split. Prints a table per layer (shape,
density, chosen kernel, dense µs, chosen µs) and writes the accelerated model's sparse
checkpoint with its choices (``winnow.inference.load_accelerated`` reads it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from winnow.cli.command import Command


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", type=Path,
        help="a Hugging Face model directory, or weights (run directory, sparse checkpoint, "
        "safetensors) of a zoo model given by --arch",
    )  # fmt: skip
    parser.add_argument("--arch", help="the zoo model the weights belong to (default: none)")
    parser.add_argument(
        "--data", default="fashion-mnist",
        help="the dataset whose examples are the timing input, with --arch (default: "
        "fashion-mnist)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=1, help="batch size timed (default: 1)")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=128,
        help="tokens per sequence, for token models (default: 128)",
    )
    parser.add_argument(
        "--threads", type=int, help="threads while timing (default: torch's current count)"
    )
    parser.add_argument(
        "--budget", type=float, default=0.3, help="seconds of timing per layer (default: 0.3)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the accelerated sparse checkpoint to write"
    )


def _load(args: argparse.Namespace):
    import torch

    if args.arch is None:
        from winnow.layerwise.pretrained import load_pretrained

        if not (args.model / "config.json").is_file():
            raise ValueError(
                f"{args.model} is not a Hugging Face model directory: give --arch for weights "
                "of a zoo model"
            )
        model = load_pretrained(args.model)
        vocab = int(getattr(model.config, "vocab_size", 1000))
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator)
        return model, ids
    from winnow import data, models
    from winnow.cli.formats import read_state_dict

    splits = data.load(args.data, limit=max(args.batch, 1))
    model = models.create_for(args.arch, splits)
    model.load_state_dict(read_state_dict(args.model), strict=True)
    return model.eval(), splits.x_test[: args.batch]


def _run(args: argparse.Namespace) -> None:
    from winnow.inference import accelerate, save_accelerated, table

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    model, example = _load(args)
    fast = accelerate(model, example, threads=args.threads, budget=args.budget)
    print(table(fast))
    save_accelerated(fast, args.out)
    print(f"written to {args.out}")


COMMANDS = (
    Command(
        "accelerate",
        "choose the fastest kernel for each pruned layer by timing them here",
        _options,
        _run,
    ),
)
