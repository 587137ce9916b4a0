"""The bench around relaxed acceptance: GSM8K-style task scores (final number, exact match) and
`leapdecode bench --sweep KEY=...` (one run per value, sweep.json and the curve)."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest

from conftest import tiny_loaded
from leapdecode.bench import cli as bench_cli
from leapdecode.bench.quality import final_number, gsm8k_answer, task_score
from leapdecode.bench.questions import load_questions, resolve_questions_path
from leapdecode.bench.sweep import expand, parse_sweep
from leapdecode.cli import main
from leapdecode.errors import InvalidSettingError

SOLUTION = "She pays 400*.5=$<<400*.5=200>>200 more\nSo it cost 600+400=$<<600+400=1000>>1000.\n#### 1,000"


def test_gsm8k_references_score_the_final_number():
    assert gsm8k_answer(SOLUTION) == Decimal(1000)
    assert gsm8k_answer("Paris") is None
    assert final_number("It costs $1,000.") == Decimal(1000)
    assert final_number("#### 12 and then 7") == Decimal(12)
    assert task_score(["200 for tickets, so 1000.0 in all"], [SOLUTION]) == 1.0
    assert task_score(["200 + 400 = 600"], [SOLUTION]) == 0.0
    assert task_score(["no number"], [SOLUTION]) == 0.0
    assert task_score(["the capital is Paris"], "Paris") == 1.0  # other references: containment, as before


def test_shipped_math_reasoning_questions_carry_final_numbers():
    questions = load_questions(resolve_questions_path("spec-bench"), categories="math_reasoning")
    assert len(questions) >= 40
    assert all(gsm8k_answer(q.reference[0]) is not None for q in questions)


def test_sweep_expands_the_methods_that_take_the_knob():
    assert parse_sweep("epsilon=0.05, 0.1,0.05") == ("epsilon", ["0.05", "0.1"])
    methods, groups = expand(["ar", "pld+typical@delta=0.2", "pld+grouped", "pld"], "epsilon", ["0.1", "0.3"])
    assert methods == ["ar", "pld+typical@delta=0.2@epsilon=0.1", "pld+typical@delta=0.2@epsilon=0.3",
                       "pld+grouped", "pld"]
    assert groups == {"pld+typical@delta=0.2": [("0.1", "pld+typical@delta=0.2@epsilon=0.1"),
                                                ("0.3", "pld+typical@delta=0.2@epsilon=0.3")]}
    assert expand(["pld@num_draft_tokens=3"], "num_draft_tokens", ["2"])[0] == ["pld@num_draft_tokens=2"]
    with pytest.raises(InvalidSettingError):
        expand(["ar", "pld"], "epsilon", ["0.1"])
    with pytest.raises(InvalidSettingError):
        parse_sweep("epsilon")


def test_bench_sweep_writes_the_curve(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_cli, "_load_model", lambda spec, device="cpu", weights="auto": tiny_loaded(
        "llama", scale=4.0))
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["w1 w2 w3 w1 w2"],
                                 "reference": ["w1 + w2\n#### 3"]}) + "\n")
    out = tmp_path / "out"
    assert main(["bench", "--questions", str(qfile), "--methods", "ar,pld+grouped", "--sweep", "tau=0,0.9",
                 "--max-new-tokens", "8", "--no-progress", "--out", str(out)]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["key"] == "tau"
    rows = sweep["series"]["pld+grouped"]
    assert [r["value"] for r in rows] == ["0", "0.9"]
    assert rows[0]["token_agreement"] == 1.0 and rows[0]["rouge_l"] == 1.0  # tau = 0: exact
    assert all(r["task_score"] in (0.0, 1.0) for r in rows)
    assert (out / "sweep_tau.png").is_file()
