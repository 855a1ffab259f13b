"""Measured inference latency: does the smaller network really run faster?"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn


def measure_latency(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    batch_size: int = 64,
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Median seconds of one forward pass of each model on a batch of ``batch_size``.

    Every model runs in eval mode under ``torch.inference_mode`` on the same random input
    (seeded). After ``warmup`` untimed passes each, the ``repeats`` timed passes are
    interleaved (model A, B, ..., then A, B, ... again), so that a change of machine load
    affects all models alike; the median of each model's times is returned. Train/eval flags
    are restored. Measured with the current ``torch.get_num_threads()``.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("repeats and batch_size must be >= 1, warmup >= 0")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *input_shape), generator=generator).to(device)
    modes = {name: [(m, m.training) for m in model.modules()] for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        for model in models.values():
            model.eval()
        with torch.inference_mode():
            for model in models.values():
                for _ in range(warmup):
                    model(x)
            for _ in range(repeats):
                for name, model in models.items():
                    sync()
                    start = time.perf_counter()
                    model(x)
                    sync()
                    times[name].append(time.perf_counter() - start)
    finally:
        for pairs in modes.values():
            for module, training in pairs:
                module.training = training
    return {name: statistics.median(values) for name, values in times.items()}
