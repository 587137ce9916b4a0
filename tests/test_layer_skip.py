"""`self-spec` (lossless): the target drafting with blocks skipped, verified by the full model.

Greedy ids equal `ar` on three architectures for several skip sets (calibrated JSON, user lists, S2D
first-k layers); sampling follows the target's exact distribution; the skip wrappers count what runs and
always leave the model as it was; invalid skip sets are refused.
"""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from leapdecode import Decoder, SamplingParams
from leapdecode.errors import InvalidSettingError
from leapdecode.layer_skip import SkipSet, StaticGate, decoder_layers, gated
from conftest import tiny_loaded
from test_exactness import random_prompts
from test_sampling import PROMPT, VOCAB, chi_square_pvalue, exact_distribution

LAYERS = 6


def logits_of(model, ids=(1, 5, 9, 2, 7)):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([list(ids)])).logits.clone()


@pytest.mark.parametrize("options", [{}, {"draft_layers": 3, "num_draft_tokens": 3},
                                     {"skip_attention": "2,4", "skip_ffn": [1, 3, 4], "adaptive": False}])
def test_self_spec_greedy_equals_ar(arch, options):
    target = tiny_loaded(arch, layers=LAYERS, scale=6.0)
    before = logits_of(target.model)
    ar, spec = Decoder(target, "ar"), Decoder(target, "self-spec", **options)
    accepted = 0
    for prompt in random_prompts(11, n=3):
        ref = ar.generate(prompt, max_new_tokens=24)
        out = spec.generate(prompt, max_new_tokens=24)
        assert out.token_ids == ref.token_ids
        accepted += sum(out.stats.accept_lengths) - len(out.stats.accept_lengths)
    assert accepted > 0  # the skipped draft agrees with the full model sometimes: drafts were used
    assert torch.equal(logits_of(target.model), before)  # model unchanged afterwards
    assert all(type(l.mlp).__name__ != "GatedMLP" for l in decoder_layers(target.model))


def test_self_spec_skip_config_file(tmp_path):
    target = tiny_loaded("llama", layers=LAYERS, scale=6.0)
    path = tmp_path / "skip.json"
    path.write_text(json.dumps({"skip_attention": [3], "skip_ffn": [2, 3, 4]}))
    ar, spec = Decoder(target, "ar"), Decoder(target, "self-spec", skip_config=str(path), skip_layers=None)
    assert spec.drafter.skip == SkipSet.of(attention=[3], ffn=[2, 3, 4])
    for prompt in random_prompts(12, n=3):
        assert spec.generate(prompt, max_new_tokens=24).token_ids == ar.generate(prompt, max_new_tokens=24).token_ids


def test_self_spec_sampling_matches_target_distribution():
    target = tiny_loaded("llama", vocab_size=VOCAB, layers=4, scale=3.0)
    params = SamplingParams(temperature=1.0)
    decoder = Decoder(target, "self-spec", skip_layers=[1, 2], num_draft_tokens=2, adaptive=False)
    runs, counts, accepted = 1000, Counter(), 0
    for seed in range(runs):
        out = decoder.generate(PROMPT, max_new_tokens=3, temperature=1.0, seed=seed)
        counts[tuple(out.token_ids)] += 1
        accepted += sum(out.stats.accept_lengths) - len(out.stats.accept_lengths)
    assert 0 < accepted  # drafts accepted (and, with partial acceptance, rejected) under sampling
    assert chi_square_pvalue(counts, exact_distribution(target, PROMPT, params), runs) > 1e-3


def test_static_gate_runs_exactly_the_kept_blocks(arch):
    target = tiny_loaded(arch, layers=LAYERS)
    model = target.model
    skip = SkipSet.of(layers=[1], attention=[4], ffn=[2, 5])
    calls = Counter()
    handles = [m.register_forward_pre_hook(lambda _m, _a, key=(kind, i): calls.update([key]))
               for i, l in enumerate(decoder_layers(model)) for kind, m in (("attn", l.self_attn), ("ffn", l.mlp))]
    try:
        with torch.inference_mode(), gated(model, StaticGate(LAYERS, skip)) as gate:
            model(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        for h in handles:
            h.remove()
    assert {i for (k, i) in calls if k == "attn"} == set(range(LAYERS)) - {1, 4}
    assert {i for (k, i) in calls if k == "ffn"} == set(range(LAYERS)) - {1, 2, 5}
    assert gate.counts.attn == [0 if i in (1, 4) else 1 for i in range(LAYERS)]


def test_model_restored_after_an_exception():
    target = tiny_loaded("qwen2", layers=LAYERS)
    before = logits_of(target.model)
    hooks = [(m, list(m._forward_pre_hooks), list(m._forward_hooks)) for m in target.model.modules()]
    with pytest.raises(RuntimeError):
        with gated(target.model, StaticGate(LAYERS, SkipSet.of(layers=[2]))):
            raise RuntimeError("boom")
    assert torch.equal(logits_of(target.model), before)
    assert [(m, list(m._forward_pre_hooks), list(m._forward_hooks)) for m in target.model.modules()] == hooks


@pytest.mark.parametrize("options,match", [
    ({"skip_layers": "0-5"}, "every layer"),
    ({"skip_ffn": [6]}, "layers 0..5"),
    ({"draft_layers": 6}, "draft_layers"),
    ({"draft_layers": 2, "skip_layers": [1]}, "one of"),
    ({"skip_layers": "x"}, "layer indices"),
    ({"num_draft_tokens": 0}, "num_draft_tokens"),
    ({"wrong": 1}, "no option"),
])
def test_self_spec_refuses_invalid_settings(options, match):
    target = tiny_loaded("llama", layers=LAYERS)
    with pytest.raises(InvalidSettingError, match=match):
        Decoder(target, "self-spec", **options)


def test_self_spec_bad_skip_config(tmp_path):
    target = tiny_loaded("llama", layers=LAYERS)
    bad = tmp_path / "bad.json"
    bad.write_text("{\"x\": 1}")
    with pytest.raises(InvalidSettingError, match="not a skip config"):
        Decoder(target, "self-spec", skip_config=str(bad))
    with pytest.raises(InvalidSettingError, match="cannot read"):
        Decoder(target, "self-spec", skip_config=str(tmp_path / "missing.json"))
