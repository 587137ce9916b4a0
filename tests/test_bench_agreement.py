"""`leapdecode bench-agreement`: greedy prefix agreement between two bench runs."""
from __future__ import annotations

import pytest

from leapdecode.bench.agreement import agreement_table, prefix_agreement
from leapdecode.bench.summary import AnswerRecord, write_answers
from leapdecode.cli import main
from leapdecode.errors import InvalidSettingError


def _record(qid: int, method: str, tokens: list[int]) -> AnswerRecord:
    return AnswerRecord(question_id=qid, category="c", method=method, turns=["x"], token_ids=[tokens],
                        new_tokens=len(tokens), wall_time=1.0, target_forward_passes=len(tokens))


def test_prefix_agreement():
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert prefix_agreement([1, 2], [7]) == 0.0
    assert prefix_agreement([], []) == 1.0


def test_table_and_command(tmp_path, capsys):
    ref = [_record(1, "ar", [1, 2, 3, 4]), _record(2, "ar", [5, 6])]
    run = [_record(1, "ar", [1, 2, 3, 4]), _record(2, "ar", [5, 7]), _record(1, "llamacpp-ar", [1, 9, 9, 9])]
    rows = {r["method"]: r for r in agreement_table(ref, run)}
    assert rows["ar"] == {"method": "ar", "compared": 2, "prefix_agreement": 0.75, "identical": 1}
    assert rows["llamacpp-ar"]["prefix_agreement"] == 0.25
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_answers(tmp_path / "a" / "answers.jsonl", ref)
    write_answers(tmp_path / "b" / "answers.jsonl", run)
    assert main(["bench-agreement", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "| llamacpp-ar | 1 | 0.250 | 0/1 |" in capsys.readouterr().out
    with pytest.raises(InvalidSettingError):
        agreement_table(ref, run, reference_method="pld")
    assert main(["bench-agreement", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
