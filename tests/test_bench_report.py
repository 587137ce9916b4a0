"""Question loading, summary arithmetic, report and plots of the benchmark (no model needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from leapdecode.bench import (
    DEFAULT_SUITE,
    AnswerRecord,
    build_summary,
    format_table,
    load_questions,
    machine_description,
    read_answers,
    write_answers,
    write_plots,
    write_report,
)
from leapdecode.bench.questions import SPEC_BENCH_DEFAULT, SPEC_BENCH_ENV, resolve_questions_path
from leapdecode.bench.summary import CATEGORY_KEYS, METHOD_KEYS, SUMMARY_KEYS
from leapdecode.errors import LeapdecodeError

REPO = Path(__file__).resolve().parents[1]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(qid: int, category: str, **extra) -> str:
    return json.dumps({"question_id": qid, "category": category, "turns": [f"q{qid}"], **extra})


# --- questions -------------------------------------------------------------------------------------


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [_row(1, "a"), _row(2, "a"), '{"question_id": 3,'])
    with pytest.raises(LeapdecodeError, match=r"q\.jsonl:3: malformed JSON"):
        load_questions(path)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"category": "a", "turns": ["x"]}, "missing field 'question_id'"),
        ({"question_id": "7", "category": "a", "turns": ["x"]}, "'question_id' must be an integer"),
        ({"question_id": 7, "category": 3, "turns": ["x"]}, "'category' must be"),
        ({"question_id": 7, "category": "a", "turns": "x"}, "'turns' must be"),
        ({"question_id": 7, "category": "a", "turns": []}, "'turns' must be"),
        ({"question_id": 7, "category": "a", "turns": ["x"], "reference": 5}, "'reference' must be"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_fields_name_the_line(tmp_path, bad, message):
    path = _write_jsonl(tmp_path / "q.jsonl", [_row(1, "a"), "", json.dumps(bad)])
    with pytest.raises(LeapdecodeError, match=r"q\.jsonl:3: ") as info:
        load_questions(path)
    assert message in str(info.value)


def test_duplicate_id_names_both_lines(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [_row(1, "a"), _row(1, "b")])
    with pytest.raises(LeapdecodeError, match=r"q\.jsonl:2: duplicate question_id 1 \(first on line 1\)"):
        load_questions(path)


def test_missing_file_is_a_leapdecode_error(tmp_path):
    with pytest.raises(LeapdecodeError, match="not found"):
        load_questions(tmp_path / "nope.jsonl")


def test_unknown_category_lists_valid_ones(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [_row(1, "math"), _row(2, "chat")])
    with pytest.raises(LeapdecodeError, match="unknown category poetry") as info:
        load_questions(path, categories=["math", "poetry"])
    assert "valid categories: math, chat" in str(info.value)


def test_categories_and_per_category_keep_file_order(tmp_path):
    cats = ["a", "b", "a", "c", "b", "a", "b"]
    path = _write_jsonl(tmp_path / "q.jsonl", [_row(i, c) for i, c in enumerate(cats, start=10)])
    assert [q.question_id for q in load_questions(path, per_category=2)] == [10, 11, 12, 13, 14]
    assert [q.question_id for q in load_questions(path, categories="b,a", per_category=1)] == [10, 11]
    assert [q.question_id for q in load_questions(path, categories=["c"])] == [13]
    with pytest.raises(LeapdecodeError):
        load_questions(path, per_category=0)


def test_project_suite_loads():
    questions = load_questions(DEFAULT_SUITE)
    by_cat: dict[str, int] = {}
    for q in questions:
        by_cat[q.category] = by_cat.get(q.category, 0) + 1
    assert len(by_cat) >= 6
    assert all(n >= 5 for n in by_cat.values()), by_cat
    assert len({q.question_id for q in questions}) == len(questions)
    multi = [q for q in questions if q.category == "multi_turn"]
    assert multi and all(len(q.turns) == 2 for q in multi)
    assert all(q.reference for q in questions if q.category == "math")


def test_spec_bench_loads_as_is(monkeypatch):
    """Spec-Bench's question file ships with the package, with its licence and source note."""
    monkeypatch.delenv(SPEC_BENCH_ENV, raising=False)
    path = resolve_questions_path("spec-bench")
    assert path == SPEC_BENCH_DEFAULT
    assert (path.parent / "LICENSE").read_text().startswith("Apache License")
    assert "fd2c1cd" in (path.parent / "README.md").read_text()
    questions = load_questions(path)
    assert len(questions) == 480
    assert len({q.category for q in questions}) == 13
    few = load_questions(path, categories=["rag", "math"], per_category=2)
    assert [q.category for q in few].count("rag") == 2 and len(few) == 4


def test_spec_bench_env_overrides(tmp_path, monkeypatch):
    other = _write_jsonl(tmp_path / "q.jsonl", [_row(1, "a")])
    monkeypatch.setenv(SPEC_BENCH_ENV, str(other))
    assert resolve_questions_path("spec-bench") == other
    monkeypatch.setenv(SPEC_BENCH_ENV, str(tmp_path / "missing.jsonl"))
    with pytest.raises(LeapdecodeError, match=SPEC_BENCH_ENV):
        resolve_questions_path("spec-bench")


def test_spec_bench_is_package_data():
    """pyproject's package-data covers the shipped question file (so a wheel carries it)."""
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = REPO / "src" / "leapdecode"
    covered = {p for pattern in patterns["leapdecode"] for p in package.glob(pattern)}
    for name in ("question.jsonl", "LICENSE", "README.md"):
        assert SPEC_BENCH_DEFAULT.parent / name in covered, name


def test_no_paths_outside_the_repository():
    """No source file refers to folders beside the repository."""
    for path in (REPO / "src").rglob("*.py"):
        text = path.read_text()
        assert "../shared" not in text and not re.search(r'/\s*"shared"', text), path


# --- summary ---------------------------------------------------------------------------------------


def _rec(qid, cat, method, new, time, passes, ids=None, accepts=None) -> AnswerRecord:
    return AnswerRecord(
        question_id=qid,
        category=cat,
        method=method,
        turns=["answer"],
        token_ids=[ids if ids is not None else [1, 2, 3]],
        new_tokens=new,
        wall_time=time,
        target_forward_passes=passes,
        accept_lengths=accepts if accepts is not None else [1] * passes,
    )


def _records() -> list[AnswerRecord]:
    return [
        # question 1 (math): ar 10 tok/s, pld 40 tok/s
        _rec(1, "math", "ar", 20, 2.0, 20),
        _rec(1, "math", "pld", 20, 0.5, 8, accepts=[4, 3, 3, 2, 2, 2, 2, 2]),
        # question 2 (math): ar 30 tok/s, pld 20 tok/s, pld differs
        _rec(2, "math", "ar", 30, 1.0, 30),
        _rec(2, "math", "pld", 30, 1.5, 10, ids=[9, 9, 9], accepts=[3] * 10),
        # question 3 (chat): ar 20 tok/s, pld 60 tok/s
        _rec(3, "chat", "ar", 40, 2.0, 40),
        _rec(3, "chat", "pld", 60, 1.0, 20, accepts=[3] * 20),
    ]


def _summary(records=None, **kw):
    return build_summary(
        records if records is not None else _records(),
        model="tiny",
        draft_model=kw.pop("draft_model", None),
        machine="test machine",
        settings=kw.pop("settings", {"max_new_tokens": 64, "temperature": 0.0}),
        peak_rss_mb=kw.pop("peak_rss_mb", {"ar": 500.0, "pld": 510.5}),
        **kw,
    )


def test_summary_arithmetic():
    s = _summary()
    ar, pld = s["methods"]["ar"], s["methods"]["pld"]
    assert ar["tokens_per_s"] == pytest.approx((10 + 30 + 20) / 3)
    assert pld["tokens_per_s"] == pytest.approx((40 + 20 + 60) / 3)
    assert ar["speedup"] == pytest.approx(1.0)
    assert pld["speedup"] == pytest.approx(40 / 20)
    assert ar["mean_accepted"] == pytest.approx(1.0)
    assert pld["mean_accepted"] == pytest.approx((20 + 30 + 60) / (8 + 10 + 20))
    assert (pld["identical_to_ar"], pld["compared"]) == (2, 3)
    assert (ar["identical_to_ar"], ar["compared"]) == (3, 3)
    assert pld["peak_rss_mb"] == 510.5

    math = pld["by_category"]["math"]
    assert math["tokens_per_s"] == pytest.approx(30.0)
    assert math["speedup"] == pytest.approx(30.0 / 20.0)
    assert math["mean_accepted"] == pytest.approx(50 / 18)
    chat = pld["by_category"]["chat"]
    assert chat["speedup"] == pytest.approx(3.0)
    assert list(pld["by_category"]) == ["math", "chat"]
    assert s["settings"]["reference_method"] == "ar"


def test_summary_key_sets_are_exact(tmp_path):
    s = json.loads(json.dumps(_summary()))  # survives JSON
    assert tuple(s) == SUMMARY_KEYS == ("model", "draft_model", "machine", "settings", "methods")
    assert list(s["methods"]) == ["ar", "pld"]
    for m in s["methods"].values():
        assert set(m) == set(METHOD_KEYS) == {
            "tokens_per_s", "speedup", "mean_accepted", "identical_to_ar", "compared",
            "peak_rss_mb", "by_category",
        }
        for c in m["by_category"].values():
            assert set(c) == set(CATEGORY_KEYS) == {"tokens_per_s", "speedup", "mean_accepted"}
    assert s["draft_model"] is None and s["model"] == "tiny" and s["machine"] == "test machine"


def test_reference_first_and_missing_ar_falls_back():
    records = [r for r in _records() if r.method != "ar"]
    records += [_rec(q, c, "hf-ar", 10, 1.0, 10) for q, c in [(1, "math"), (2, "math"), (3, "chat")]]
    s = _summary(records, peak_rss_mb={})
    assert list(s["methods"]) == ["pld", "hf-ar"]
    assert s["settings"]["reference_method"] == "pld"
    assert "'ar' was not run" in s["settings"]["reference_note"]
    assert s["methods"]["pld"]["speedup"] == pytest.approx(1.0)
    assert s["methods"]["hf-ar"]["peak_rss_mb"] is None

    s2 = _summary(list(reversed(_records())))
    assert list(s2["methods"]) == ["ar", "pld"]


def test_summary_rejects_duplicates_and_zero_time():
    with pytest.raises(LeapdecodeError, match="two records"):
        _summary(_records() + [_rec(1, "math", "ar", 1, 1.0, 1)])
    with pytest.raises(LeapdecodeError, match="wall_time"):
        _summary([_rec(1, "math", "ar", 1, 0.0, 1)])


def test_answers_round_trip(tmp_path):
    records = _records()
    path = write_answers(tmp_path / "answers.jsonl", records)
    assert read_answers(path) == records
    path.write_text(path.read_text() + '{"question_id": 1}\n')
    with pytest.raises(LeapdecodeError, match=r"answers\.jsonl:7: missing field"):
        read_answers(path)


def test_machine_description_is_one_line():
    text = machine_description()
    assert "torch" in text and "\n" not in text


# --- report and plots ------------------------------------------------------------------------------


def test_report_and_plots_are_written(tmp_path):
    records = _records()
    summary = _summary()
    pngs = write_plots(tmp_path, summary, records)
    assert [p.name for p in pngs] == ["speedup_by_category.png", "tokens_per_s.png", "accepted_histogram.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000

    report = write_report(tmp_path, summary, records, "leapdecode bench --methods ar,pld")
    text = report.read_text()
    assert report == tmp_path / "report.md"
    assert "leapdecode bench --methods ar,pld" in text and "test machine" in text
    assert "WARNING" in text and "**pld**: 1 of 3 questions differ (question ids: 2)" in text
    assert "### math" in text and "### chat" in text
    assert "| pld | 40.0 | 2.00x | 2.89 | 2/3 | 510 |" in text
    assert "![Speedup over the reference, per category](speedup_by_category.png)" in text

    quiet = write_report(tmp_path, summary, records, "cmd", lossless=["ar"]).read_text()
    assert "WARNING" not in quiet and "## Lossy methods" in quiet
    sampled = _summary(settings={"temperature": 0.7})
    assert "WARNING" not in write_report(tmp_path, sampled, records, "cmd").read_text()


def test_format_table_aligns_columns():
    table = format_table(_summary())
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["method", "tokens/s"]
    assert len({len(line) for line in lines}) == 1  # every row padded to the same width
    assert "2.00x" in lines[3] and "2/3" in lines[3]
    per_cat = format_table(_summary(), category="chat").splitlines()
    assert "3.00x" in per_cat[3] and len(per_cat) == 4
