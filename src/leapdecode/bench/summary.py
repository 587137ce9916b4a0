"""Benchmark records and the numbers computed from them (``answers.jsonl`` and ``summary.json``).

Definitions follow Spec-Bench:
- ``tokens_per_s``: mean over questions of ``new_tokens / wall_time`` (all turns of a question summed).
- ``speedup``: a method's mean tokens/s divided by the reference method's (``ar``) mean tokens/s,
  overall and per category (per category: both means over that category's questions).
- ``mean_accepted``: total new tokens / total target forward passes (tokens committed per target pass).
- ``identical_to_ar`` / ``compared``: questions whose token ids equal the reference's, out of those that
  both ran. The reference method counts as compared with itself.
- When the run has a lossy method, ``leapdecode bench`` adds ``token_agreement``, ``rouge_l`` and
  ``task_score`` to every method entry (the first two null for lossless methods; see
  ``leapdecode.bench.quality``).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from statistics import fmean
from typing import Any

from leapdecode.errors import LeapdecodeError

REFERENCE_METHOD = "ar"

SUMMARY_KEYS = ("model", "draft_model", "machine", "settings", "methods")
METHOD_KEYS = (
    "tokens_per_s",
    "speedup",
    "mean_accepted",
    "identical_to_ar",
    "compared",
    "peak_rss_mb",
    "by_category",
)
CATEGORY_KEYS = ("tokens_per_s", "speedup", "mean_accepted")


@dataclass
class TurnOutput:
    """One generation call: what was generated and what it cost."""

    token_ids: list[int]  # new tokens only
    wall_time: float  # seconds, prefill included, tokenization excluded
    target_forward_passes: int  # decode passes of the target (for peers: every target forward call)
    accept_lengths: list[int] = field(default_factory=list)  # tokens committed per target pass


@dataclass
class AnswerRecord:
    """One method's answer to one question (the median repeat when repeated)."""

    question_id: int
    category: str
    method: str
    turns: list[str]  # answer text, one per question turn
    token_ids: list[list[int]]  # generated token ids, one list per turn
    new_tokens: int  # generated tokens, all turns
    wall_time: float  # seconds, all turns (prefill included, warm-up excluded)
    target_forward_passes: int  # target decode passes, all turns
    accept_lengths: list[int] = field(default_factory=list)  # tokens committed per target pass
    identical_to_ar: bool | None = None  # token_ids == the reference method's; None if not compared
    kv_bytes: int | None = None  # bytes the KV cache held after the last turn (its tensors); None for peers

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second for this question."""
        return self.new_tokens / self.wall_time


def compare_to_reference(
    records: Sequence[AnswerRecord], reference_method: str = REFERENCE_METHOD
) -> list[AnswerRecord]:
    """Return copies of ``records`` with ``identical_to_ar`` filled in (None where no reference ran)."""
    reference = {r.question_id: r.token_ids for r in records if r.method == reference_method}
    return [
        replace(
            r,
            identical_to_ar=(
                r.token_ids == reference[r.question_id] if r.question_id in reference else None
            ),
        )
        for r in records
    ]


def build_summary(
    records: Sequence[AnswerRecord],
    *,
    model: str,
    draft_model: str | None,
    machine: str,
    settings: Mapping[str, Any],
    peak_rss_mb: Mapping[str, float],
    reference_method: str = REFERENCE_METHOD,
) -> dict[str, Any]:
    """Compute ``summary.json`` (see the module docstring for the definitions).

    Methods appear in the order ``reference_method`` first, then first appearance in ``records``;
    categories in order of first appearance. When ``reference_method`` has no records the first method
    is used and ``settings["reference_note"]`` says so; ``settings["reference_method"]`` is always set.
    A per-category speedup is ``None`` when the reference has no records in that category, and
    ``peak_rss_mb`` is ``None`` for a method missing from ``peak_rss_mb``.
    """
    if not records:
        raise LeapdecodeError("no benchmark records to summarise")
    _check_records(records)

    methods = list(dict.fromkeys(r.method for r in records))
    settings = dict(settings)
    if reference_method in methods:
        reference = reference_method
    else:
        reference = methods[0]
        settings["reference_note"] = (
            f"reference method {reference_method!r} was not run; speedups and identical counts "
            f"are relative to {reference!r}"
        )
    settings["reference_method"] = reference
    methods.remove(reference)
    methods.insert(0, reference)
    categories = list(dict.fromkeys(r.category for r in records))
    records = compare_to_reference(records, reference)

    by_method = {m: [r for r in records if r.method == m] for m in methods}
    ref_records = by_method[reference]
    ref_tps = _mean_tps(ref_records)
    ref_tps_by_cat = {
        c: _mean_tps([r for r in ref_records if r.category == c]) for c in categories
    }

    out: dict[str, Any] = {}
    for method in methods:
        recs = by_method[method]
        compared = [r for r in recs if r.identical_to_ar is not None]
        by_category = {}
        for cat in categories:
            cat_recs = [r for r in recs if r.category == cat]
            if not cat_recs:
                continue
            tps = _mean_tps(cat_recs)
            by_category[cat] = {
                "tokens_per_s": tps,
                "speedup": _ratio(tps, ref_tps_by_cat[cat]),
                "mean_accepted": _mean_accepted(cat_recs),
            }
        rss = peak_rss_mb.get(method)
        tps = _mean_tps(recs)
        out[method] = {
            "tokens_per_s": tps,
            "speedup": _ratio(tps, ref_tps),
            "mean_accepted": _mean_accepted(recs),
            "identical_to_ar": sum(bool(r.identical_to_ar) for r in compared),
            "compared": len(compared),
            "peak_rss_mb": None if rss is None else float(rss),
            "by_category": by_category,
        }
    return {
        "model": model,
        "draft_model": draft_model,
        "machine": machine,
        "settings": settings,
        "methods": out,
    }


def write_summary(path: str | os.PathLike[str], summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` (indented, key order kept)."""
    path = Path(path)
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_answers(path: str | os.PathLike[str], records: Iterable[AnswerRecord]) -> Path:
    """Write records as JSONL, one record per line."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
    return path


def read_answers(path: str | os.PathLike[str]) -> list[AnswerRecord]:
    """Read records written by ``write_answers``; errors name the file and line."""
    path = Path(path)
    names = {f.name for f in fields(AnswerRecord)}
    required = {f.name for f in fields(AnswerRecord) if f.name not in ("accept_lengths", "identical_to_ar")}
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise LeapdecodeError(f"cannot read answers file {path}: {exc}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LeapdecodeError(f"{path}:{lineno}: malformed JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise LeapdecodeError(f"{path}:{lineno}: expected a JSON object")
        missing = sorted(required - row.keys())
        if missing:
            raise LeapdecodeError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        records.append(AnswerRecord(**{k: v for k, v in row.items() if k in names}))
    return records


def machine_description() -> str:
    """One line: CPU model, cores, RAM, torch version and GPU (if any)."""
    parts = [f"{_cpu_model()} ({os.cpu_count() or '?'} logical cores)"]
    ram = _ram_gib()
    if ram is not None:
        parts.append(f"{ram:.1f} GiB RAM")
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
        else:
            parts.append("no GPU")
    except ImportError:  # pragma: no cover - torch is a dependency
        parts.append("torch not installed")
    parts.append(f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
    return ", ".join(parts)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _check_records(records: Sequence[AnswerRecord]) -> None:
    seen = set()
    for r in records:
        key = (r.method, r.question_id)
        if key in seen:
            raise LeapdecodeError(
                f"two records for method {r.method!r} and question {r.question_id}; "
                "keep one (the median repeat) per question and method"
            )
        seen.add(key)
        if not r.wall_time > 0:
            raise LeapdecodeError(
                f"record for method {r.method!r}, question {r.question_id} has wall_time {r.wall_time}"
            )


def _mean_tps(records: Sequence[AnswerRecord]) -> float | None:
    return fmean(r.tokens_per_s for r in records) if records else None


def _mean_accepted(records: Sequence[AnswerRecord]) -> float:
    passes = sum(r.target_forward_passes for r in records)
    return sum(r.new_tokens for r in records) / passes if passes else 0.0


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference
