"""``report.md`` and the console table, both from ``summary.json`` plus the answer records."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from leapdecode.bench.summary import AnswerRecord, compare_to_reference

PLOT_FILES = {
    "speedup_by_category.png": "Speedup over the reference, per category",
    "tokens_per_s.png": "Mean tokens per second, per method",
    "accepted_histogram.png": "Tokens committed per target forward pass",
}
_MAX_LISTED_IDS = 12


QUALITY_COLUMNS = (("token_agreement", "token agreement"), ("rouge_l", "ROUGE-L"), ("task_score", "task score"))
"""summary.json quality keys (present when the run has a lossy method) and their table headings."""


def format_table(summary: Mapping[str, Any], category: str | None = None) -> str:
    """Plain-text table with aligned columns: overall, or for one category.

    When the summary carries quality keys (a run with a lossy method), the overall table adds token
    agreement and ROUGE-L against the reference method ("-" for lossless methods) and the task score against
    the questions' references ("-" where no question has one).
    """
    quality = category is None and any("token_agreement" in m for m in summary["methods"].values())
    header = ["method", "tokens/s", "speedup", "mean accepted", "identical", "peak RSS MB"]
    if quality:
        header += [title for _, title in QUALITY_COLUMNS]
    rows = [header]
    for name, m in summary["methods"].items():
        if category is None:
            rows.append([
                name,
                _num(m["tokens_per_s"], 1),
                _speedup(m["speedup"]),
                _num(m["mean_accepted"], 2),
                f"{m['identical_to_ar']}/{m['compared']}",
                _num(m["peak_rss_mb"], 0),
            ] + ([_quality(m.get(key)) for key, _ in QUALITY_COLUMNS] if quality else []))
        elif category in m["by_category"]:
            c = m["by_category"][category]
            rows.append([
                name, _num(c["tokens_per_s"], 1), _speedup(c["speedup"]), _num(c["mean_accepted"], 2)
            ])
    if category is not None:
        rows = [r[:4] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def differing_questions(
    records: Sequence[AnswerRecord], reference_method: str
) -> dict[str, list[int]]:
    """Per method, the question ids whose token ids differ from the reference method's."""
    out: dict[str, list[int]] = {}
    for r in compare_to_reference(records, reference_method):
        if r.identical_to_ar is False:
            out.setdefault(r.method, []).append(r.question_id)
    return out


def write_report(
    out_dir: str | os.PathLike[str],
    summary: Mapping[str, Any],
    records: Sequence[AnswerRecord],
    command_line: str,
    lossless: Collection[str] | None = None,
) -> Path:
    """Write ``out_dir/report.md`` and return its path.

    ``lossless`` names the methods that promise output identical to the reference; a lossless method
    whose greedy output differs gets a loud warning. ``None`` treats every method as lossless.
    Plots already written in ``out_dir`` (see ``plots.write_plots``) are linked.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(summary.get("settings", {}))
    reference = settings.get("reference_method", "ar")
    methods = summary["methods"]
    lossless_set = set(methods) if lossless is None else set(lossless)

    lines = ["# leapdecode benchmark report", ""]
    lines += ["Produced by:", "", "```", command_line, "```", ""]
    lines += [f"Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.", ""]
    lines += _warning_section(summary, records, reference, lossless_set, settings)
    lines += ["## Setup", ""]
    lines += [f"- Machine: {summary['machine']}"]
    lines += [f"- Target model: `{summary['model']}`"]
    lines += [f"- Draft model: `{summary['draft_model']}`" if summary.get("draft_model") else "- Draft model: none"]
    lines += [f"- Questions: {len({r.question_id for r in records})}, methods: {', '.join(methods)}"]
    lines += [""]
    if settings:
        lines += ["| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {_md(v)} |" for k, v in settings.items()]
        lines += [""]

    lines += ["## Overall", ""]
    lines += [
        f"Speedup is mean tokens/s over `{reference}`'s mean tokens/s on the same questions and "
        "machine, methods interleaved per prompt. Mean accepted is generated tokens per target "
        "forward pass. Identical counts questions whose token ids equal "
        f"`{reference}`'s.",
        "",
    ]
    lines += ["| method | tokens/s | speedup | mean accepted | identical/compared | peak RSS (MB) |"]
    lines += ["| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in methods.items():
        lines.append(
            f"| {name} | {_num(m['tokens_per_s'], 1)} | {_speedup(m['speedup'])} | "
            f"{_num(m['mean_accepted'], 2)} | {m['identical_to_ar']}/{m['compared']} | "
            f"{_num(m['peak_rss_mb'], 0)} |"
        )
    lines += [""]

    lines += ["## By category", ""]
    for cat in _categories(summary):
        count = len({r.question_id for r in records if r.category == cat})
        lines += [f"### {cat} ({count} question{'s' if count != 1 else ''})", ""]
        lines += ["| method | tokens/s | speedup | mean accepted |", "| --- | ---: | ---: | ---: |"]
        for name, m in methods.items():
            c = m["by_category"].get(cat)
            if c is not None:
                lines.append(
                    f"| {name} | {_num(c['tokens_per_s'], 1)} | {_speedup(c['speedup'])} | "
                    f"{_num(c['mean_accepted'], 2)} |"
                )
        lines += [""]

    plots = [(f, title) for f, title in PLOT_FILES.items() if (out_dir / f).is_file()]
    if plots:
        lines += ["## Plots", ""]
        for file, title in plots:
            lines += [f"![{title}]({file})", ""]

    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def _warning_section(
    summary: Mapping[str, Any],
    records: Sequence[AnswerRecord],
    reference: str,
    lossless: set[str],
    settings: Mapping[str, Any],
) -> list[str]:
    differing = differing_questions(records, reference)
    lossy_diff = {m: q for m, q in differing.items() if m not in lossless}
    loud = {m: q for m, q in differing.items() if m in lossless}
    lines: list[str] = []
    sampled = _is_sampled(settings)
    if loud and not sampled:
        lines += [f"## ⚠️ WARNING: lossless methods differ from `{reference}`", ""]
        lines += [
            "These methods promise greedy output identical to the reference, token for token, "
            "but produced different tokens. Their speed numbers do not count until this is explained.",
            "",
        ]
        for method, qids in loud.items():
            m = summary["methods"][method]
            lines.append(
                f"- **{method}**: {m['compared'] - m['identical_to_ar']} of {m['compared']} questions "
                f"differ (question ids: {_ids(qids)})"
            )
        lines += [""]
    elif loud:
        lines += ["## Outputs differ from the reference (sampling)", ""]
        lines += [
            "Decoding was sampled, so token-for-token identity is not expected; see the tables for "
            "identical/compared.",
            "",
        ]
    if lossy_diff:
        lines += ["## Lossy methods", ""]
        for method, qids in lossy_diff.items():
            m = summary["methods"][method]
            lines.append(
                f"- {method}: {m['identical_to_ar']} of {m['compared']} questions identical to "
                f"`{reference}` (differ: {_ids(qids)})"
            )
        lines += [""]
    return lines


def _is_sampled(settings: Mapping[str, Any]) -> bool:
    if settings.get("do_sample") is True:
        return True
    try:
        return float(settings.get("temperature") or 0.0) > 0.0
    except (TypeError, ValueError):
        return False


def _categories(summary: Mapping[str, Any]) -> list[str]:
    cats: dict[str, None] = {}
    for m in summary["methods"].values():
        cats.update(dict.fromkeys(m["by_category"]))
    return list(cats)


def _ids(qids: Sequence[int]) -> str:
    shown = ", ".join(str(q) for q in qids[:_MAX_LISTED_IDS])
    return shown + (f", ... ({len(qids) - _MAX_LISTED_IDS} more)" if len(qids) > _MAX_LISTED_IDS else "")


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _quality(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _speedup(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
