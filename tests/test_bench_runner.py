"""The `leapdecode bench` runner and command on tiny random models (no weights are loaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from statistics import fmean

import pytest

from conftest import tiny_loaded
from leapdecode import methods as method_registry
from leapdecode.bench import Question, read_answers
from leapdecode.bench import cli as bench_cli
from leapdecode.bench.runner import (
    WARMUP_PROMPT,
    BenchSettings,
    PromptBuilder,
    TurnOutput,
    _peer_accept_lengths,
    make_runner,
    run_benchmark,
    valid_method_names,
)
from leapdecode.bench.summary import CATEGORY_KEYS, METHOD_KEYS, SUMMARY_KEYS
from leapdecode.cli import main
from leapdecode.drafters.base import NoDrafter
from leapdecode.methods import LOSSLESS, MethodSpec

SETTINGS = BenchSettings(max_new_tokens=10, warmup_tokens=2)
QUESTIONS = [
    Question(1, "copy", ["w1 w2 w3 w4 w5 w1 w2 w3"]),
    Question(2, "copy", ["w9 w8 w7 w9 w8"]),
    Question(3, "chat", ["w20 w21", "w22 w23"]),  # two turns
]


def _target():
    return tiny_loaded("llama", scale=4.0)  # sharp logits: repetitive output that prompt lookup can copy


def _draft():
    return tiny_loaded("llama", seed=1, scale=4.0)


def _bench(tmp_path, methods, questions=QUESTIONS, settings=SETTINGS, draft=None, **kw):
    return run_benchmark(_target(), draft, questions, methods, settings, tmp_path / "out",
                         progress=False, plots=False, **kw)


# ----- fake and recording runners ------------------------------------------------------------------


@dataclass
class FakeRunner:
    """Returns fixed tokens (per method) and scripted wall times; logs every call."""

    name: str
    log: list
    tokens: list[int]
    times: list[float] = field(default_factory=list)
    interrupt_on: int | None = None  # raise KeyboardInterrupt on the prompt that starts with this id

    def run(self, prompt_ids, max_new_tokens):
        self.log.append((self.name, list(prompt_ids)))
        if self.interrupt_on is not None and prompt_ids[0] == self.interrupt_on:
            raise KeyboardInterrupt
        wall = self.times.pop(0) if self.times else 0.01
        return TurnOutput(list(self.tokens), wall, len(self.tokens), [1] * len(self.tokens))


def _fake_factory(log, tokens=None, times=None, interrupt_on=None):
    def factory(name, target, draft, settings):
        return FakeRunner(name, log, (tokens or {}).get(name, [11, 12]), list((times or {}).get(name, [])),
                          interrupt_on)

    return factory


# ----- summary and files ----------------------------------------------------------------------------


def test_summary_keys_and_speedup_come_from_the_records(tmp_path):
    result = _bench(tmp_path, "ar,pld,hf-ar,hf-pld", command_line="leapdecode bench --test")
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert tuple(summary) == SUMMARY_KEYS
    assert list(summary["methods"]) == ["ar", "pld", "hf-ar", "hf-pld"]
    records = read_answers(out / "answers.jsonl")
    assert len(records) == 12 and {r.method for r in records} == set(summary["methods"])

    def tps(method, category=None):
        return fmean(r.new_tokens / r.wall_time for r in records
                     if r.method == method and category in (None, r.category))

    for name, m in summary["methods"].items():
        assert set(m) == set(METHOD_KEYS)
        assert m["tokens_per_s"] == pytest.approx(tps(name))
        assert m["speedup"] == pytest.approx(tps(name) / tps("ar"))
        mine = [r for r in records if r.method == name]
        assert m["mean_accepted"] == pytest.approx(
            sum(r.new_tokens for r in mine) / sum(r.target_forward_passes for r in mine))
        assert (m["identical_to_ar"], m["compared"]) == (3, 3)  # all lossless, greedy
        assert m["peak_rss_mb"] > 10
        for cat, c in m["by_category"].items():
            assert set(c) == set(CATEGORY_KEYS)
            assert c["speedup"] == pytest.approx(tps(name, cat) / tps("ar", cat))
    assert summary["methods"]["ar"]["mean_accepted"] == 1.0
    assert summary["methods"]["hf-ar"]["mean_accepted"] == 1.0
    assert summary["methods"]["pld"]["mean_accepted"] > 1.0  # the copyable prompts paid off
    for r in records:
        assert sum(r.accept_lengths) == r.new_tokens == sum(map(len, r.token_ids))
        assert len(r.accept_lengths) == r.target_forward_passes and r.identical_to_ar is True
    settings = summary["settings"]
    assert settings["lossless_mismatches"] == {} and settings["interrupted"] is False
    assert settings["max_new_tokens"] == 10 and settings["questions_run"] == 3
    assert "leapdecode bench --test" in (out / "report.md").read_text()
    assert not result.mismatches and not result.interrupted
    assert result.table.splitlines()[0].startswith("method")


def test_draft_model_methods_run_with_a_draft(tmp_path):
    result = _bench(tmp_path, "ar,draft,hf-assisted", questions=QUESTIONS[:1], draft=_draft())
    assert result.summary["draft_model"] == "tiny-llama-1"
    assert not result.mismatches
    assert {r.method: r.identical_to_ar for r in result.records} == {"ar": True, "draft": True,
                                                                     "hf-assisted": True}


def test_peer_accept_lengths_from_positions():
    # prompt of 8 tokens: prefill commits 1, then calls at positions 8, 9 (commits 3), 12 (commits 2)
    assert _peer_accept_lengths([0, 8, 9, 12], prompt_len=8, new_tokens=7) == [1, 1, 3, 2]
    assert _peer_accept_lengths([0, 8, None], 8, 3) == []
    assert _peer_accept_lengths([0, 8], 8, 5) == [1, 4]
    assert _peer_accept_lengths([0, 9], 8, 1) == []  # inconsistent: not derivable


# ----- order, repeats, interrupt --------------------------------------------------------------------


def test_methods_are_interleaved_per_question_and_repeat_and_the_median_is_kept(tmp_path):
    log = []
    questions = [Question(1, "a", ["w31 w2"]), Question(2, "a", ["w32 w2"])]
    times = {"pld": [9.0, 0.3, 0.1, 0.2, 0.5, 0.4, 0.6]}  # warm-up, then q1: median 0.2, q2: median 0.5
    result = _bench(tmp_path, "ar,pld,hf-ar", questions=questions,
                    settings=BenchSettings(max_new_tokens=4, repeats=3, warmup_tokens=2),
                    runner_factory=_fake_factory(log, times=times))
    warm = PromptBuilder(_target()).ids([WARMUP_PROMPT], [])
    names = ["ar", "pld", "hf-ar"]
    assert [(m, ids) for m, ids in log[:3]] == [(m, warm) for m in names]
    order = [(ids[0], m) for m, ids in log[3:]]
    assert order == [(q, m) for q in (31, 32) for _repeat in range(3) for m in names]
    assert result.call_order == [(q, r, m) for q in (1, 2) for r in range(3) for m in names]
    pld = {r.question_id: r.wall_time for r in result.records if r.method == "pld"}
    assert pld == {1: pytest.approx(0.2), 2: pytest.approx(0.5)}


def test_ctrl_c_keeps_complete_questions_only(tmp_path):
    questions = [Question(q, "a", [f"w{30 + q} w2"]) for q in (1, 2, 3)]
    result = _bench(tmp_path, "ar,pld", questions=questions,
                    runner_factory=_fake_factory([], interrupt_on=32))  # Ctrl-C inside question 2
    assert result.interrupted
    records = read_answers(tmp_path / "out" / "answers.jsonl")
    assert {(r.question_id, r.method) for r in records} == {(1, "ar"), (1, "pld")}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["interrupted"] is True and summary["settings"]["questions_run"] == 1


def test_cli_ctrl_c_exits_130_after_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "_load_model", lambda spec, device="cpu", weights="auto": _target())
    real = bench_cli.run_benchmark
    monkeypatch.setattr(bench_cli, "run_benchmark", lambda *a, **kw: real(
        *a, **{**kw, "runner_factory": _fake_factory([], interrupt_on=32), "plots": False}))
    qfile = _questions_file(tmp_path, [Question(q, "a", [f"w{30 + q}"]) for q in (1, 2)])
    assert main(["bench", "--questions", str(qfile), "--methods", "ar,pld", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(read_answers(tmp_path / "o" / "answers.jsonl")) == 2


# ----- multi-turn -----------------------------------------------------------------------------------


def test_second_turn_follows_each_methods_own_first_answer(tmp_path):
    log = []
    tokens = {"ar": [11, 12], "pld": [13, 14, 15]}  # the two methods answer differently
    result = _bench(tmp_path, "ar,pld", questions=[QUESTIONS[2]],
                    runner_factory=_fake_factory(log, tokens=tokens))
    calls = log[2:]  # after the warm-up
    assert [m for m, _ in calls] == ["ar", "ar", "pld", "pld"]
    # no chat template: turns and answers joined as plain text
    assert calls[0][1] == [20, 21]
    assert calls[1][1] == [20, 21, 11, 12, 22, 23]
    assert calls[3][1] == [20, 21, 13, 14, 15, 22, 23]
    ar = next(r for r in result.records if r.method == "ar")
    assert ar.turns == ["w11 w12", "w11 w12"] and ar.token_ids == [[11, 12], [11, 12]]
    assert ar.new_tokens == 4 and ar.target_forward_passes == 4
    assert result.mismatches == {"pld": [3]}  # and different answers are flagged


def test_second_turn_uses_the_chat_template_when_there_is_one():
    target = _target()
    target.tokenizer.chat_template = (
        "{% for m in messages %}{{ 'w1' if m['role'] == 'user' else 'w2' }} {{ m['content'] }} "
        "{% endfor %}{% if add_generation_prompt %}w3{% endif %}"
    )
    prompts = PromptBuilder(target)
    assert prompts.chat
    assert prompts.ids(["w20 w21", "w22"], ["w40 w41"]) == [1, 20, 21, 2, 40, 41, 1, 22, 3]
    assert PromptBuilder(target, chat=False).ids(["w20", "w22"], ["w40"]) == [20, 40, 22]


# ----- a broken "lossless" method -------------------------------------------------------------------


class _TokenFlippingDrafter(NoDrafter):
    """Proposes nothing but replaces the token the target is about to read: output drifts from ar."""

    def __init__(self) -> None:
        self.calls = 0

    def propose(self, ctx):
        self.calls += 1
        if self.calls >= 2:
            ctx.tokens[-1] = (ctx.tokens[-1] + 1) % 64
        return None


@pytest.fixture
def broken_method(monkeypatch):
    spec = MethodSpec("broken", LOSSLESS, "alters the token fed to the target (test only)", "-",
                      lambda build: _TokenFlippingDrafter())
    monkeypatch.setitem(method_registry._REGISTRY, spec.name, spec)
    return spec.name


def _questions_file(tmp_path, questions):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question_id": q.question_id, "category": q.category,
                                        "turns": q.turns}) + "\n" for q in questions))
    return path


def test_wrong_lossless_method_is_flagged_and_fails_strict(tmp_path, monkeypatch, capsys, broken_method):
    monkeypatch.setattr(bench_cli, "_load_model", lambda spec, device="cpu", weights="auto": _target())
    qfile = _questions_file(tmp_path, QUESTIONS[:2])
    args = ["bench", "--questions", str(qfile), "--methods", "ar,broken,pld", "--max-new-tokens", "8",
            "--no-progress"]

    assert main(args + ["--out", str(tmp_path / "loose")]) == 0  # flagged, but not fatal
    err = capsys.readouterr().err
    assert "WARNING: lossless method broken differs from ar on 2 question(s): 1, 2" in err
    summary = json.loads((tmp_path / "loose" / "summary.json").read_text())
    assert summary["settings"]["lossless_mismatches"] == {"broken": [1, 2]}
    assert (summary["methods"]["broken"]["identical_to_ar"], summary["methods"]["broken"]["compared"]) == (0, 2)
    assert summary["methods"]["pld"]["identical_to_ar"] == 2
    report = (tmp_path / "loose" / "report.md").read_text()
    assert "WARNING" in report and "**broken**: 2 of 2 questions differ" in report
    assert f"--questions {qfile}" in report and "--methods ar,broken,pld" in report
    for png in ("speedup_by_category.png", "tokens_per_s.png", "accepted_histogram.png"):
        assert (tmp_path / "loose" / png).is_file()

    assert main(args + ["--out", str(tmp_path / "strict"), "--strict"]) == 1
    out, err = capsys.readouterr()
    assert "broken" in out and "WARNING: lossless method broken" in err


# ----- input errors, all before any model loads ----------------------------------------------------


def _no_loading(spec, device="cpu", weights="auto"):
    raise AssertionError(f"a model was loaded ({spec}) before the input was checked")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "ar,nope"], f"unknown method nope; valid methods: {', '.join(valid_method_names())}"),
        (["--methods", "ar,hf-assisted"], "method hf-assisted needs a draft model (--draft-model)"),
        (["--methods", "draft"], "method draft needs a draft model"),
        (["--categories", "copy,poetry"], "unknown category poetry in"),
        (["--repeats", "0"], "repeats must be a positive integer"),
        (["--max-new-tokens", "-1"], "max_new_tokens must be a positive integer"),
        (["--methods", "ar,hf-ar", "--temperature", "0.7"], "hf-ar run transformers' generate() greedy only"),
        (["--per-category", "0"], "per_category must be a positive integer"),
        (["--threads", "0"], "threads must be a positive integer"),
        (["--methods", "ar,hf-pld@num=3"], "the transformers peers take no @options: hf-pld@num=3"),
    ],
)
def test_bad_input_is_reported_before_loading(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(bench_cli, "_load_model", _no_loading)
    qfile = _questions_file(tmp_path, QUESTIONS)
    assert main(["bench", "--questions", str(qfile), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    if "unknown category" in message:
        assert "valid categories: copy, chat" in err


def test_malformed_jsonl_and_bad_out_dir_are_reported_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "_load_model", _no_loading)
    qfile = tmp_path / "bad.jsonl"
    qfile.write_text('{"question_id": 1, "category": "a", "turns": ["w1"]}\n{"question_id": 2,\n')
    assert main(["bench", "--questions", str(qfile), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err

    good = _questions_file(tmp_path, QUESTIONS)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["bench", "--questions", str(good), "--out", str(blocker / "sub")]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert main(["bench", "--questions", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "question file not found" in capsys.readouterr().err


def test_valid_methods_are_the_registry_then_the_peers():
    names = valid_method_names()
    assert {"ar", "pld", "draft"} <= set(names)
    assert names[-5:] == ["hf-ar", "hf-pld", "hf-assisted", "llamacpp-ar", "llamacpp-pld"]


def test_run_benchmark_checks_methods_itself(tmp_path):
    with pytest.raises(Exception, match="needs a draft model"):
        _bench(tmp_path, "ar,hf-assisted")
    assert make_runner("hf-ar", _target(), None, SETTINGS).name == "hf-ar"
