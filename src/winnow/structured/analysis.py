"""How similar are pruned structures? Correlation of per-layer kept ratios.

Wang et al. 2020 ("Pruning from Scratch", Sec. 3 and Fig. 3) observe that the structures found
on random weights differ more from seed to seed than those found after training, and argue
that this diversity is a feature: many structures are equally good. Here a structure is the
vector of its per-layer kept-channel ratios (one entry per channel group, in the same order
for every structure), and two structures are compared by the Pearson correlation of their
vectors:

    ρ(a, b) = Σ_l (a_l − ā)(b_l − b̄) / sqrt(Σ_l (a_l − ā)² · Σ_l (b_l − b̄)²).

A structure whose ratios are all equal (uniform scaling) has no variance: its correlations are
undefined (NaN).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np


def structure_correlation(
    ratios: Mapping[str, Mapping[str, float]],
) -> tuple[list[str], np.ndarray]:
    """Pearson correlation matrix of kept-ratio vectors, one per labelled structure.

    ``ratios`` maps a label (e.g. ``"scratch/seed 0"``) to ``{group name: kept ratio}``. Only
    the groups every structure has are compared, in the first structure's order. Returns the
    labels and the symmetric matrix (NaN where a vector is constant).
    """
    labels = list(ratios)
    if not labels:
        return [], np.zeros((0, 0))
    shared = [g for g in ratios[labels[0]] if all(g in ratios[label] for label in labels)]
    if len(shared) < 2:
        raise ValueError("structures need at least two groups in common to be correlated")
    vectors = np.array([[float(ratios[label][g]) for g in shared] for label in labels])
    centred = vectors - vectors.mean(axis=1, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = (centred @ centred.T) / np.outer(norms, norms)
    matrix[np.outer(norms, norms) == 0] = np.nan
    return labels, np.clip(matrix, -1.0, 1.0)


def mean_correlation(
    labels: Sequence[str],
    matrix: np.ndarray,
    first: Callable[[str], bool],
    second: Callable[[str], bool] | None = None,
) -> float | None:
    """Mean correlation over the pairs (i ≠ j) with ``first(label_i)`` and ``second(label_j)``.

    ``second`` defaults to ``first`` (the mean pairwise correlation within one set, e.g. one
    method across seeds). NaN entries are skipped; None when no pair is left.
    """
    second = second or first
    values = [
        matrix[i, j]
        for i, a in enumerate(labels)
        for j, b in enumerate(labels)
        if i != j and first(a) and second(b) and not math.isnan(matrix[i, j])
    ]
    return float(np.mean(values)) if values else None


def correlation_heatmap(
    labels: Sequence[str],
    matrix: np.ndarray,
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Draw ``matrix`` as a heatmap (−1 blue to 1 red, NaN blank, values printed) to a PNG.

    Uses matplotlib's Agg renderer through its object-oriented API (no pyplot state); the file
    is written atomically. Needs matplotlib (``pip install winnow[plots]``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install winnow[plots]") from None
    from winnow.io import atomic_write_bytes

    n = len(labels)
    side = min(max(4.8, 0.55 * n + 2.5), 24.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="coolwarm", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax, label="Pearson correlation of per-layer kept ratios")
    ax.set_xticks(range(n), labels, rotation=60, ha="right")
    ax.set_yticks(range(n), labels)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                if not math.isnan(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7)
    if title:
        ax.set_title(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
