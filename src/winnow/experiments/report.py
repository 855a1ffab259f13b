"""Reports rebuilt from the store: grouped statistics, markdown/CSV tables and PNG plots.

Feed these with :meth:`RunStore.records <winnow.experiments.store.RunStore.records>`, never
with results held in memory, so a report can be regenerated after the fact. Every file is
written atomically. Plots need matplotlib (``pip install winnow[plots]``), imported only when
a plot is drawn.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from winnow.io import atomic_write_bytes


def aggregate(
    rows: Sequence[Mapping[str, Any]], by: Sequence[str], values: Sequence[str]
) -> list[dict[str, Any]]:
    """Group ``rows`` by the keys ``by`` and summarise the keys ``values`` in each group.

    Groups come in order of first appearance. Each output row holds the ``by`` keys, ``n``
    (the number of rows in the group) and, for each value key, ``{key}_mean`` and ``{key}_std``
    (the sample standard deviation, with n - 1; 0 for a single value). Missing and None
    values are skipped; a key with no value in a group gets None for both.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        key = json.dumps([row.get(k) for k in by], sort_keys=True, default=str)
        groups.setdefault(key, []).append(row)
    out = []
    for members in groups.values():
        summary: dict[str, Any] = {k: members[0].get(k) for k in by}
        summary["n"] = len(members)
        for key in values:
            found = [float(r[key]) for r in members if r.get(key) is not None]
            mean = math.fsum(found) / len(found) if found else None
            if len(found) > 1:
                std = math.sqrt(math.fsum((v - mean) ** 2 for v in found) / (len(found) - 1))
            else:
                std = 0.0 if found else None
            summary[f"{key}_mean"] = mean
            summary[f"{key}_std"] = std
        out.append(summary)
    return out


def configuration_groups(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], ignore: Sequence[str] = ("seed",)
) -> tuple[list[str], list[str]]:
    """How to group records of runs: by every configuration field in ``keys`` but those in
    ``ignore`` (the seed: runs that differ only by it are repetitions), so runs of different
    configurations never pool. Returns ``(by, varying)``: the grouping keys, and those whose
    value differs between the rows (a report shows them, so its table says which fields
    differ)."""
    by = [k for k in keys if k not in ignore]

    def value(row: Mapping[str, Any], key: str) -> str:
        return json.dumps(row.get(key), sort_keys=True, default=str)

    varying = [k for k in by if len({value(r, k) for r in rows}) > 1]
    return by, varying


def describe(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``"epochs=2, lr=0.01"``: the values of ``keys`` in a row (for labels)."""
    return ", ".join(f"{k}={row.get(k)}" for k in keys)


def _cell(value: Any, spec: str | None) -> str:
    if value is None:
        return ""
    if spec is not None:
        return spec.format(value) if "{" in spec else format(value, spec)
    if isinstance(value, float):
        return format(value, ".4g")
    return str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    formats: Mapping[str, str] | None = None,
) -> str:
    """A markdown table of ``rows`` with the given columns, one line per row.

    ``formats`` maps a column to a format spec (``".3f"``, ``".1%"``) or a ``str.format``
    template (``"{:.2f} %"``); floats default to ``".4g"``. Missing and None values are empty
    cells; ``|`` in a cell is escaped.
    """
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [_cell(row.get(c), formats.get(c)).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    path_stem: str | os.PathLike,
    formats: Mapping[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write ``rows`` as ``<path_stem>.md`` (formatted) and ``<path_stem>.csv`` (full values).

    The CSV holds the raw values (None as an empty field) so nothing is lost to formatting.
    Both files are written atomically; returns their paths (markdown, CSV).
    """
    stem = Path(path_stem)
    md_path = stem.with_name(stem.name + ".md")
    csv_path = stem.with_name(stem.name + ".csv")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    atomic_write_bytes(md_path, markdown_table(rows, columns, formats).encode("utf-8"))
    atomic_write_bytes(csv_path, buffer.getvalue().encode("utf-8"))
    return md_path, csv_path


def _figure(title: str | None, width: float = 6.4):
    """A new matplotlib figure with one axes, drawn by the Agg renderer.

    It uses matplotlib's object-oriented API, not pyplot, so it works headless and leaves the
    user's pyplot backend alone.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install winnow[plots]") from None
    fig = Figure(figsize=(width, 4.4), layout="constrained")
    ax = fig.add_subplot()
    if title:
        ax.set_title(title)
    return fig, ax


def _save_png(fig, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def line_plot(
    series: Mapping[str, Sequence[tuple[float, float, float | None]]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
    reference: float | None = None,
    reference_label: str = "dense",
) -> Path:
    """Plot one line per label through its ``(x, y, yerr)`` points, with error bars; save a PNG.

    Points are drawn in order of x; a point whose y is None is left out, a None yerr draws no
    bar. ``logx`` puts x on a log scale; ``reference`` adds a dashed horizontal line (the dense
    model's accuracy, say) labelled ``reference_label``. A label of the form ``"name (variant)"``
    is drawn dashed in the colour of ``"name"`` (a control beside its method). Written
    atomically; returns the path.
    """
    fig, ax = _figure(title)
    colours: dict[str, str] = {}
    ticks: set[float] = set()
    for label, points in series.items():
        kept = sorted((p for p in points if p[1] is not None), key=lambda p: p[0])
        if not kept:
            continue
        xs, ys = [p[0] for p in kept], [p[1] for p in kept]
        errs = [0.0 if p[2] is None else p[2] for p in kept]
        base, variant = label.split(" (", 1) if " (" in label else (label, "")
        line = ax.errorbar(
            xs,
            ys,
            yerr=errs,
            label=label,
            marker="o",
            markersize=3,
            capsize=3,
            color=colours.get(base),
            linestyle="--" if variant else "-",
        )
        colours.setdefault(base, line.lines[0].get_color())
        ticks.update(xs)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label=reference_label)
    if logx:
        ax.set_xscale("log")
        if 0 < len(ticks) <= 12:
            ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
            ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save_png(fig, path)


def bar_plot(
    groups: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
) -> Path:
    """Grouped bars: one bar colour per group, one cluster per category; save a PNG.

    ``groups`` maps a group (a method) to its value per category (a layer), e.g. the kept
    fraction of each layer for several methods. Categories come in order of first appearance;
    a category a group lacks gets no bar. Written atomically; returns the path.
    """
    categories = list(dict.fromkeys(c for values in groups.values() for c in values))
    fig, ax = _figure(title, width=min(max(6.4, 0.6 * len(categories)), 24.0))
    width = 0.8 / max(len(groups), 1)
    for i, (label, values) in enumerate(groups.items()):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(categories))]
        ys = [values.get(c) for c in categories]
        ax.bar(
            [x for x, y in zip(xs, ys, strict=True) if y is not None],
            [y for y in ys if y is not None],
            width=width,
            label=label,
        )
    ax.set_xticks(range(len(categories)), categories, rotation=45, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    if groups:
        ax.legend()
    return _save_png(fig, path)
