"""PNG plots of a benchmark run (matplotlib's Agg canvas; pyplot's global state is not touched)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from leapdecode.bench.summary import AnswerRecord

_DPI = 110


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_speedup_by_category(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Grouped bars: one group per category (plus "overall"), one bar per method."""
    methods = list(summary["methods"])
    cats = list(dict.fromkeys(c for m in summary["methods"].values() for c in m["by_category"]))
    groups = cats + ["overall"]
    colors = _colors(methods)
    fig = _figure(max(6.5, 1.0 + 0.28 * len(groups) * max(len(methods), 2)), 4.6)
    ax = fig.add_subplot()
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        m = summary["methods"][method]
        values = [m["by_category"].get(c, {}).get("speedup") for c in cats] + [m["speedup"]]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=method,
               color=colors[method])
    reference = summary.get("settings", {}).get("reference_method", "ar")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.margins(y=0.18)
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 6 else 0, ha="right"
                  if len(groups) > 6 else "center")
    ax.set_ylabel(f"speedup over {reference} (x)")
    ax.set_title(f"Speedup by category: {summary['model']}")
    ax.legend(ncols=min(len(methods), 4), fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)


def plot_tokens_per_s(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """One bar per method: mean tokens/s, labelled with its speedup."""
    methods = list(summary["methods"])
    colors = _colors(methods)
    fig = _figure(max(5.0, 1.2 * len(methods) + 1.5), 4.2)
    ax = fig.add_subplot()
    values = [summary["methods"][m]["tokens_per_s"] or 0.0 for m in methods]
    bars = ax.bar(methods, values, color=[colors[m] for m in methods])
    labels = []
    for m in methods:
        s = summary["methods"][m]["speedup"]
        labels.append(f"{summary['methods'][m]['tokens_per_s']:.1f}" + ("" if s is None else f"\n{s:.2f}x"))
    ax.bar_label(bars, labels, fontsize="small", padding=2)
    ax.set_ylim(0, max(values + [1e-9]) * 1.25)
    ax.set_ylabel("tokens / s (mean over questions)")
    ax.set_title(f"Decoding speed: {summary['model']}")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)


def plot_accepted_histogram(records: Sequence[AnswerRecord], path: str | os.PathLike[str]) -> Path:
    """Small multiples, one per method: how many tokens each target forward pass committed."""
    methods = list(dict.fromkeys(r.method for r in records))
    colors = _colors(methods)
    counts = {m: Counter() for m in methods}
    for r in records:
        counts[r.method].update(r.accept_lengths)
    observed = [k for c in counts.values() for k in c]
    low, top = min(observed + [1]), max(observed + [1])
    ncols = min(3, max(len(methods), 1))
    nrows = -(-len(methods) // ncols) if methods else 1
    fig = _figure(3.4 * ncols + 0.4, 2.6 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    xs = list(range(low, top + 1))
    for ax, method in zip(axes.flat, methods):
        total = sum(counts[method].values())
        fractions = [counts[method][x] / total if total else 0.0 for x in xs]
        ax.bar(xs, fractions, width=0.85, color=colors[method])
        mean = sum(x * counts[method][x] for x in xs) / total if total else 0.0
        ax.set_title(f"{method} (mean {mean:.2f}, {total} passes)", fontsize="medium")
        ax.set_xticks(xs if top - low <= 16 else range(low, top + 1, max(1, (top - low) // 8)))
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    fig.supxlabel("tokens committed per target forward pass")
    fig.supylabel("fraction of passes")
    return _save(fig, path)


def write_plots(
    out_dir: str | os.PathLike[str], summary: Mapping[str, Any], records: Sequence[AnswerRecord]
) -> list[Path]:
    """Write the three PNGs into ``out_dir`` and return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_speedup_by_category(summary, out_dir / "speedup_by_category.png"),
        plot_tokens_per_s(summary, out_dir / "tokens_per_s.png"),
        plot_accepted_histogram(records, out_dir / "accepted_histogram.png"),
    ]


def _save(fig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    fig.savefig(path, format="png")
    return path
