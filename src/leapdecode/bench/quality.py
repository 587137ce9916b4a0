"""Quality columns for lossy methods: agreement with the reference method's output (`ar` unless it was
not run) and, where a question has a `reference`, a task score. Written to `quality.json`, a section of
`report.md` and `speed_vs_quality.png` (one point per method and setting); when the run has a lossy
method, `summary.json` and the printed table also carry token_agreement, rouge_l and task_score (the first
two null / "-" for the lossless methods, whose output is the reference's by promise; their task score is
shown, the baseline the lossy methods' scores are read against).

- token_agreement: share of positions where the method's token equals the reference method's token at
  the same position, over the longer of the two outputs (all turns concatenated).
- prefix_agreement: tokens before the first difference, over the reference method's length.
- rouge_l: ROUGE-L F1 (longest common subsequence of lower-cased words) of the method's answer against
  the reference method's answer (Lin 2004; computed here, no package).
- task_score: for questions with a `reference`, 1 when the normalised reference (any accepted answer
  for list references) occurs in the normalised answer of that turn (the last turn for a single
  string), else 0; mean over such questions; None when no question has one. A GSM8K-style reference
  (a worked solution ending in `#### <number>`, Spec-Bench's math_reasoning) is scored by exact match of
  the final number: the number after the answer's own `####` if it writes one, else the last number in
  the answer (commas dropped, compared as decimals, so 1,000 = 1000 = 1000.0).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from statistics import fmean
from typing import Any

from leapdecode.bench.summary import AnswerRecord

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over words; 1.0 for two empty texts."""
    c, r = words(candidate), words(reference)
    if not c and not r:
        return 1.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def token_agreement(ids: Sequence[int], ref: Sequence[int]) -> float:
    longest = max(len(ids), len(ref))
    return 1.0 if longest == 0 else sum(a == b for a, b in zip(ids, ref)) / longest


def prefix_agreement(ids: Sequence[int], ref: Sequence[int]) -> float:
    n = 0
    while n < min(len(ids), len(ref)) and ids[n] == ref[n]:
        n += 1
    return 1.0 if not ref else n / len(ref)


def _normal(text: str) -> str:
    return " ".join(words(text))


_FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def gsm8k_answer(reference: str) -> Decimal | None:
    """The final number of a GSM8K-style worked solution (`... #### 1000`); None for other references."""
    found = _FINAL.search(reference)
    return _decimal(found.group(1)) if found else None


def final_number(answer: str) -> Decimal | None:
    """The number an answer ends on: the one after its own `####`, else its last number."""
    own = _FINAL.findall(answer)
    if own:
        return _decimal(own[-1])
    numbers = _NUMBER.findall(answer)
    return _decimal(numbers[-1]) if numbers else None


def _matches(answer: str, accepted: str) -> bool:
    target = gsm8k_answer(accepted)
    if target is not None:
        return final_number(answer) == target
    return bool(_normal(accepted)) and _normal(accepted) in _normal(answer)


def task_score(turns: Sequence[str], reference) -> float | None:
    """1.0 / 0.0 when the answer contains the reference (see the module docstring); None without one."""
    if reference is None or not turns:
        return None
    if isinstance(reference, str):
        pairs = [(turns[-1], [reference])]
    else:
        pairs = []
        for answer, ref in zip(turns, reference):
            accepted = [ref] if isinstance(ref, str) else [x for x in _flatten(ref)]
            if accepted:
                pairs.append((answer, accepted))
    if not pairs:
        return None
    return float(all(any(_matches(ans, a) for a in acc) for ans, acc in pairs))


def _flatten(value):
    for v in value:
        if isinstance(v, str):
            yield v
        elif isinstance(v, list):
            yield from _flatten(v)


def quality_table(records: Sequence[AnswerRecord], references: Mapping[int, Any], reference_method: str = "ar"
                  ) -> dict[str, dict[str, Any]]:
    """Per method: mean token_agreement, prefix_agreement, rouge_l (vs the reference method) and task_score."""
    ref = {r.question_id: r for r in records if r.method == reference_method}
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r.method for r in records):
        rows = [r for r in records if r.method == method]
        compared = [(r, ref[r.question_id]) for r in rows if r.question_id in ref]
        flat = lambda rec: [t for turn in rec.token_ids for t in turn]  # noqa: E731
        scores = [s for r in rows if (s := task_score(r.turns, references.get(r.question_id))) is not None]
        out[method] = {
            "token_agreement": fmean(token_agreement(flat(r), flat(a)) for r, a in compared) if compared else None,
            "prefix_agreement": fmean(prefix_agreement(flat(r), flat(a)) for r, a in compared) if compared else None,
            "rouge_l": fmean(rouge_l("\n".join(r.turns), "\n".join(a.turns)) for r, a in compared) if compared else None,
            "task_score": fmean(scores) if scores else None,
            "task_questions": len(scores),
            "compared": len(compared),
        }
    return out


SUMMARY_QUALITY_KEYS = ("token_agreement", "rouge_l", "task_score")
"""The quality columns copied into summary.json's method entries when the run has a lossy method."""


def add_quality_to_summary(summary: dict[str, Any], quality: Mapping[str, Mapping[str, Any]],
                           lossy: Sequence[str]) -> dict[str, Any]:
    """Copy SUMMARY_QUALITY_KEYS into each method of `summary` (for methods not in `lossy` only task_score, the
    others None).

    Nothing is added when `lossy` is empty: a lossless-only run keeps summary.json's usual keys.
    """
    if not lossy:
        return summary
    for name, entry in summary["methods"].items():
        q = quality.get(name, {})
        for key in SUMMARY_QUALITY_KEYS:
            entry[key] = q.get(key) if name in lossy or key == "task_score" else None
    return summary


def plot_speed_vs_quality(summary: Mapping[str, Any], quality: Mapping[str, Mapping[str, Any]],
                          path: str | os.PathLike[str]) -> Path:
    """Speedup over the reference (y) against ROUGE-L vs the reference (x): one point per method and setting."""
    from leapdecode.bench.plots import _colors, _figure

    reference = summary.get("settings", {}).get("reference_method", "ar")

    methods = [m for m in summary["methods"] if quality.get(m, {}).get("rouge_l") is not None]
    colors = _colors(methods)
    fig = _figure(7.0, 4.8)
    ax = fig.add_subplot()
    for m in methods:
        x, y = quality[m]["rouge_l"], summary["methods"][m]["speedup"]
        if y is None:
            continue
        ax.scatter([x], [y], color=colors[m], s=40, zorder=3)
        ax.annotate(m, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(f"ROUGE-L against {reference}'s output (1 = same text)")
    ax.set_ylabel(f"speedup over {reference} (tokens/s ratio)")
    ax.set_title("speed versus quality")
    ax.grid(True, alpha=0.3)
    path = Path(path)
    fig.savefig(path)
    return path


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def write_quality(out_dir, summary: Mapping[str, Any], records: Sequence[AnswerRecord], questions,
                  lossless: Sequence[str] = (), plots: bool = True,
                  quality: Mapping[str, Mapping[str, Any]] | None = None) -> list[Path]:
    """quality.json, the speed-vs-quality PNG, and a quality section appended to report.md
    (`quality`: an already computed `quality_table`, else it is computed here)."""
    out = Path(out_dir)
    reference = summary.get("settings", {}).get("reference_method", "ar")
    if quality is None:
        quality = quality_table(records, {q.question_id: q.reference for q in questions}, reference)
    files = [out / "quality.json"]
    files[0].write_text(json.dumps({"reference_method": reference, "methods": quality,
                                    "definitions": __doc__.split("\n\n", 1)[1].strip()}, indent=2) + "\n")
    lines = ["", f"## Quality against {reference}", "",
             f"Token agreement, prefix agreement and ROUGE-L compare each method's answers with {reference}'s; "
             "the task score checks answers against the questions' references (see quality.json for "
             "definitions).", "",
             "| method | promise | speedup | token agreement | prefix agreement | ROUGE-L | task score |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, q in quality.items():
        speed = summary["methods"].get(m, {}).get("speedup")
        promise = "lossless" if m in lossless else "other runtime" if m.startswith("llamacpp-") else "lossy"
        lines.append(f"| {m} | {promise} | {_fmt(speed)} | {_fmt(q['token_agreement'])} | {_fmt(q['prefix_agreement'])} "
                     f"| {_fmt(q['rouge_l'])} | {_fmt(q['task_score'])} ({q['task_questions']} q) |")
    if plots:
        try:
            files.append(plot_speed_vs_quality(summary, quality, out / "speed_vs_quality.png"))
            lines += ["", "![speed versus quality](speed_vs_quality.png)"]
        except ImportError:
            pass
    report = out / "report.md"
    if report.exists():
        with report.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
    return files
