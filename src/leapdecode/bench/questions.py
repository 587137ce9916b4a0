"""Question sets in Spec-Bench's JSONL format: the project's suite and Spec-Bench itself.

One JSON object per line: ``question_id`` (int), ``category`` (str), ``turns`` (list of 1+ user
messages; turn 2 is asked after the model's answer to turn 1) and an optional ``reference``.
Spec-Bench stores ``reference`` as a list with one entry per turn (for ``rag``: a list of accepted
answers per turn); the project suite stores one string.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from leapdecode.errors import InvalidSettingError, LeapdecodeError

REPO_ROOT = Path(__file__).resolve().parents[3]
"""The repository root (valid for a source checkout or an editable install)."""

DEFAULT_SUITE = REPO_ROOT / "benchmarks" / "suite.jsonl"
"""The project's own small suite (7 categories x 6 prompts)."""

SPEC_BENCH_ENV = "LEAPDECODE_SPEC_BENCH"
"""Environment variable that may point at Spec-Bench's ``question.jsonl``."""

SPEC_BENCH_DEFAULT = Path(__file__).resolve().parents[1] / "data" / "spec_bench" / "question.jsonl"
"""Spec-Bench's ``question.jsonl``, shipped with the package (Apache-2.0; source and commit in the README
beside it); used when the environment variable is unset."""


@dataclass
class Question:
    """One benchmark prompt: the user turns to send, in order."""

    question_id: int
    category: str
    turns: list[str]
    reference: str | list | None = None  # suite: one string; Spec-Bench: a list, one entry per turn


def resolve_questions_path(spec: str | os.PathLike[str]) -> Path:
    """Map ``"suite"`` / ``"spec-bench"`` (or a file path) to an existing question file."""
    name = os.fspath(spec)
    if name == "suite":
        path = DEFAULT_SUITE
    elif name in ("spec-bench", "spec_bench", "specbench"):
        override = os.environ.get(SPEC_BENCH_ENV)
        path = Path(override).expanduser() if override else SPEC_BENCH_DEFAULT
        if not path.is_file():
            where = f"${SPEC_BENCH_ENV} names {path}" if override else f"the packaged file {path} is missing"
            raise LeapdecodeError(
                f"Spec-Bench questions not found: {where}; point {SPEC_BENCH_ENV} at Spec-Bench's "
                "question.jsonl (data/spec_bench/question.jsonl in its repository)"
            )
    else:
        path = Path(name).expanduser()
    if not path.is_file():
        raise LeapdecodeError(f"question file not found: {path}")
    return path


def load_questions(
    path: str | os.PathLike[str] = DEFAULT_SUITE,
    categories: Iterable[str] | str | None = None,
    per_category: int | None = None,
) -> list[Question]:
    """Read and validate a question file; keep file order.

    ``categories`` (names, or one comma-separated string) keeps only those categories;
    ``per_category`` keeps the first N questions of each category, in file order.
    Raises ``LeapdecodeError`` naming the file and line for any malformed line.
    """
    path = Path(path)
    if per_category is not None and (isinstance(per_category, bool) or per_category < 1):
        raise InvalidSettingError(f"per_category must be a positive integer, got {per_category!r}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LeapdecodeError(f"question file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LeapdecodeError(f"cannot read question file {path}: {exc}") from None

    questions: list[Question] = []
    seen_ids: dict[int, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        question = _parse_line(line, path, lineno)
        if question.question_id in seen_ids:
            raise LeapdecodeError(
                f"{path}:{lineno}: duplicate question_id {question.question_id} "
                f"(first on line {seen_ids[question.question_id]})"
            )
        seen_ids[question.question_id] = lineno
        questions.append(question)
    if not questions:
        raise LeapdecodeError(f"{path}: no questions in file")

    if categories is not None:
        wanted = _category_list(categories)
        valid = list(dict.fromkeys(q.category for q in questions))
        unknown = [c for c in wanted if c not in valid]
        if unknown:
            raise LeapdecodeError(
                f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} in {path}; "
                f"valid categories: {', '.join(valid)}"
            )
        questions = [q for q in questions if q.category in wanted]

    if per_category is not None:
        taken: dict[str, int] = {}
        kept = []
        for q in questions:
            if taken.get(q.category, 0) < per_category:
                taken[q.category] = taken.get(q.category, 0) + 1
                kept.append(q)
        questions = kept
    return questions


def categories_of(questions: Iterable[Question]) -> list[str]:
    """Categories in order of first appearance."""
    return list(dict.fromkeys(q.category for q in questions))


def _category_list(categories: Iterable[str] | str) -> list[str]:
    if isinstance(categories, str):
        categories = categories.split(",")
    names = [c.strip() for c in categories if c.strip()]
    if not names:
        raise InvalidSettingError("categories is empty")
    return names


def _parse_line(line: str, path: Path, lineno: int) -> Question:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LeapdecodeError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(row, dict):
        raise LeapdecodeError(f"{where}: expected a JSON object, got {type(row).__name__}")

    for key in ("question_id", "category", "turns"):
        if key not in row:
            raise LeapdecodeError(f"{where}: missing field {key!r}")
    qid, category, turns = row["question_id"], row["category"], row["turns"]
    if not isinstance(qid, int) or isinstance(qid, bool):
        raise LeapdecodeError(f"{where}: 'question_id' must be an integer, got {qid!r}")
    if not isinstance(category, str) or not category.strip():
        raise LeapdecodeError(f"{where}: 'category' must be a non-empty string, got {category!r}")
    if (
        not isinstance(turns, list)
        or not turns
        or not all(isinstance(t, str) and t.strip() for t in turns)
    ):
        raise LeapdecodeError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    reference = row.get("reference")
    if reference is not None and not _strings_only(reference):
        raise LeapdecodeError(
            f"{where}: 'reference' must be a string, a (nested) list of strings or null"
        )
    return Question(question_id=qid, category=category, turns=list(turns), reference=reference)


def _strings_only(value: object) -> bool:
    """True for a string or a (nested) list whose leaves are all strings."""
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(_strings_only(v) for v in value)
