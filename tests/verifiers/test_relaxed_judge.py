"""The judge rule and `leapdecode train-judge`: offline labels from the target's own continuation, a linear head
fitted with checkpoints and resume, saved with the target's fingerprint (refused for another model); at
threshold 1 `BASE+judge` gives BASE's tokens, a judge that accepts everything accepts every draft."""
from __future__ import annotations

import json
import random

import pytest
import torch

import leapdecode
from leapdecode import Decoder
from leapdecode.cli import main
from leapdecode.drafters.checkpoint import target_fingerprint
from leapdecode.errors import InvalidSettingError
from leapdecode.training.judge import fit_judge, label_answer
from leapdecode.verifiers.judge import JudgeRule, load_judge, save_judge
from conftest import tiny_loaded


def constant_judge(folder, target, bias: float):
    """A judge for `target` whose score is sigmoid(bias) everywhere."""
    hidden = target.model.config.hidden_size
    head = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(bias)
    save_judge(folder, head, {"model": target.name, "target_fingerprint": target_fingerprint(target.model),
                              "hidden_size": hidden})
    return folder


def prompts(n=3):
    rng = random.Random(0)
    return [[rng.randrange(1, 64) for _ in range(10)] for _ in range(n)]


@pytest.mark.parametrize("base", ["pld", "draft", "draft-tree"])
def test_judge_at_threshold_one_equals_the_exact_base(arch, base, tmp_path):
    target = tiny_loaded(arch, scale=4.0)
    draft = tiny_loaded(arch, seed=1, scale=4.0, layers=1) if base != "pld" else None
    folder = constant_judge(tmp_path / "j", target, 30.0)  # scores 1.0 everywhere, never > 1
    exact = Decoder(target, base, draft=draft)
    judged = Decoder(target, f"{base}+judge", draft=draft, judge=str(folder), threshold=1.0)
    for i, prompt in enumerate(prompts()):
        for kw in ({}, {"temperature": 0.9, "seed": i}):
            assert judged.generate(prompt, max_new_tokens=16, **kw).token_ids == \
                exact.generate(prompt, max_new_tokens=16, **kw).token_ids


def test_an_accepting_judge_accepts_every_draft(tmp_path):
    target = tiny_loaded("llama", scale=2.0)
    draft = tiny_loaded("llama", seed=1, scale=2.0, layers=1)
    folder = constant_judge(tmp_path / "j", target, 5.0)
    out = Decoder(target, "draft+judge", draft=draft, judge=str(folder), threshold=0.5,
                  num_draft_tokens=4).generate(prompts()[0], max_new_tokens=20)
    assert out.stats.acceptance_rate == 1.0
    rule = JudgeRule(torch.nn.Linear(4, 1), threshold=0.5)
    assert rule.score(0) == 0.0  # no hidden states bound: nothing is admitted


def test_judge_for_another_model_is_refused(tmp_path):
    target, other = tiny_loaded("llama"), tiny_loaded("llama", seed=5)
    folder = constant_judge(tmp_path / "j", other, 1.0)
    with pytest.raises(InvalidSettingError, match="not for this model"):
        Decoder(target, "pld+judge", judge=str(folder))
    with pytest.raises(InvalidSettingError, match="no judge"):
        load_judge(tmp_path / "empty", "x", 64)


def test_labels_and_fit_resume(tmp_path):
    target = tiny_loaded("qwen2", scale=3.0)
    answer = Decoder(target, "ar").generate(prompts()[0], max_new_tokens=16).token_ids
    feats, labels = label_answer(target.model, prompts()[0], list(answer), random.Random(0), positions=5,
                                 alternatives=3, horizon=4, tolerance=1.0)
    assert feats.shape == (15, target.model.config.hidden_size) and set(labels.tolist()) <= {0.0, 1.0}
    labels[0], labels[1] = 1.0, 0.0  # both classes present
    head, facts = fit_judge(feats, labels, tmp_path, steps=20, checkpoint_every=10, progress=False)
    assert facts["steps"] == 20 and (tmp_path / "checkpoint.pt").is_file()
    again, facts2 = fit_judge(feats, labels, tmp_path, steps=30, checkpoint_every=10, progress=False)
    assert facts2["steps"] == 30 and torch.load(tmp_path / "checkpoint.pt")["step"] == 30


def test_train_judge_command(tmp_path, monkeypatch, capsys):
    target = tiny_loaded("llama", scale=3.0)
    monkeypatch.setattr(leapdecode, "load", lambda *a, **kw: target)
    monkeypatch.setenv("LEAPDECODE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "judge"
    args = ["train-judge", "--out", str(out), "--prompts", "3", "--max-new-tokens", "12", "--positions", "3",
            "--horizon", "3", "--steps", "10", "--checkpoint-every", "5", "--no-progress"]
    assert main(args) == 0
    config = json.loads((out / "judge.json").read_text())
    assert config["target_fingerprint"] == target_fingerprint(target.model) and "label_source" in config
    assert (out / "labels.pt").is_file()
    assert main(args) == 0  # a second run reuses the labels and the checkpoint
    dec = Decoder(target, "pld+judge")  # the default judge of this model
    assert dec.drafter.acceptance.name == "judge" and dec.drafter.needs_target_hidden
    assert "labelled mismatches" in capsys.readouterr().err
