"""``leapdecode bench --sweep KEY=v1,v2,...``: one knob of a method drawn as a speed-versus-quality curve.

Every method of ``--methods`` that takes KEY (a relaxed ``BASE+RULE`` whose rule has that knob, or a method
written with ``@KEY=...``) runs once per value, as ``method@KEY=value``; the other methods (``ar``, the
reference) run once. After the run, ``sweep.json`` holds per swept method and value the speedup over the
reference and the quality columns (token agreement, ROUGE-L, task score; ``quality.py``), and
``sweep_KEY.png`` draws them against the value: where quality starts to fall and what speed it buys.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from leapdecode.errors import InvalidSettingError
from leapdecode.methods import split_variant

QUALITY_KEYS = ("token_agreement", "rouge_l", "task_score")


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``"epsilon=0.05,0.1,0.3"`` -> ("epsilon", ["0.05", "0.1", "0.3"])."""
    key, sep, values = text.partition("=")
    key = key.strip().replace("-", "_")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or not items:
        raise InvalidSettingError(f"--sweep expects KEY=v1,v2,..., got {text!r}")
    return key, list(dict.fromkeys(items))


def takes(method: str, key: str) -> bool:
    """Whether `method` has the knob `key`: written with @key=..., or a relaxed rule with that knob."""
    from leapdecode.verifiers.relaxed import RULES

    base, options = split_variant(method)
    if key in options:
        return True
    _, plus, rule = base.rpartition("+")
    return bool(plus) and rule in RULES and key in RULES[rule][0]


def expand(methods: Sequence[str], key: str, values: Sequence[str]) -> tuple[list[str], dict[str, list]]:
    """The method list with each method that takes `key` replaced by one variant per value, and per swept
    method its [(value, variant name)] in order."""
    out: list[str] = []
    groups: dict[str, list] = {}
    for method in methods:
        if not takes(method, key):
            out.append(method)
            continue
        base, *pairs = method.split("@")
        kept = [p for p in pairs if p.split("=", 1)[0].strip().replace("-", "_") != key]
        for value in values:
            name = "@".join([base, *kept, f"{key}={value}"])
            out.append(name)
            groups.setdefault(method, []).append((value, name))
    if not groups:
        raise InvalidSettingError(f"--sweep {key}: no method in --methods takes {key!r} (a relaxed method "
                                  f"BASE+RULE with that knob, e.g. pld+typical for epsilon, or method@{key}=...)")
    return list(dict.fromkeys(out)), groups


def sweep_series(groups: Mapping[str, list], summary: Mapping[str, Any],
                 quality: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    series = {}
    for method, points in groups.items():
        rows = []
        for value, name in points:
            row = {"value": value, "method": name, "speedup": summary["methods"].get(name, {}).get("speedup")}
            row.update({k: quality.get(name, {}).get(k) for k in QUALITY_KEYS})
            rows.append(row)
        series[method] = rows
    return series


def _x(values: list[str]) -> tuple[list[float], bool]:
    try:
        return [float(v) for v in values], True
    except ValueError:
        return list(range(len(values))), False


def plot_sweep(series: Mapping[str, list], key: str, reference: str, path: Path) -> Path:
    """Speedup (left) and quality (right) against the knob's value, one colour per swept method."""
    from leapdecode.bench.plots import _colors, _figure

    colors = _colors(list(series))
    fig = _figure(10.0, 4.2)
    speed, quality = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    styles = {"rouge_l": "-", "token_agreement": "--", "task_score": ":"}
    for method, rows in series.items():
        xs, numeric = _x([r["value"] for r in rows])
        pts = [(x, r["speedup"]) for x, r in zip(xs, rows) if r["speedup"] is not None]
        if pts:
            speed.plot(*zip(*pts), marker="o", color=colors[method], label=method)
        for k, style in styles.items():
            pts = [(x, r[k]) for x, r in zip(xs, rows) if r[k] is not None]
            if pts:
                quality.plot(*zip(*pts), marker="o", linestyle=style, color=colors[method], label=f"{method}: {k}")
        if not numeric:
            for ax in (speed, quality):
                ax.set_xticks(xs, [r["value"] for r in rows])
    speed.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    speed.set_ylabel(f"speedup over {reference}")
    quality.set_ylabel(f"quality (against {reference}; task score: references)")
    quality.set_ylim(-0.02, 1.02)
    for ax in (speed, quality):
        ax.set_xlabel(key)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"sweep of {key}: speed and quality")
    fig.savefig(path)
    return path


def write_sweep(out_dir, key: str, groups: Mapping[str, list], summary: Mapping[str, Any],
                plots: bool = True) -> list[Path]:
    """sweep.json and sweep_KEY.png in `out_dir` (its quality.json gives the quality columns)."""
    out = Path(out_dir)
    quality_file = out / "quality.json"
    quality = json.loads(quality_file.read_text())["methods"] if quality_file.exists() else {}
    reference = summary.get("settings", {}).get("reference_method", "ar")
    series = sweep_series(groups, summary, quality)
    files = [out / "sweep.json"]
    files[0].write_text(json.dumps({"key": key, "reference_method": reference, "series": series}, indent=2) + "\n")
    if plots:
        try:
            files.append(plot_sweep(series, key, reference, out / f"sweep_{key}.png"))
        except ImportError:
            pass
    return files
