"""Lossy layer-skipping methods (ffn-skip, skipdecode, first, early-exit): they run on three
architectures, execute exactly the blocks their rules say (counted with hooks on the real modules),
leave the model unchanged, refuse invalid settings (routers that name bad layers or could skip every
layer included); FiRST routers train and round-trip; the bench's quality columns (quality.json,
report.md, summary.json and the printed table) and method@option variants."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from leapdecode import Decoder
from leapdecode.bench.questions import Question
from leapdecode.bench.quality import lcs_length, prefix_agreement, rouge_l, task_score, token_agreement
from leapdecode.bench.runner import BenchSettings, run_benchmark
from leapdecode.errors import InvalidSettingError
from leapdecode.lossy.first import Routers, train_routers
from leapdecode.layer_skip import decoder_layers
from conftest import tiny_loaded

L = 5
NEW = 16
PROMPT = [3, 9, 4, 12, 7, 1]
PASSES = 1 + NEW  # the prefill, then one pass per new token
SKIP_1_AND_3 = Routers((1, 2, 3), torch.zeros(3, 64), torch.tensor([-5.0, 5.0, -5.0]), L)

# method, options, expected attention calls, expected FFN calls over the whole generation
CASES = {
    # warm-up: the prefill + 2 tokens run everything; then the 2 (= 0.4 * 5) most saturated FFNs are skipped
    "ffn-skip": ({"fraction": 0.4, "warmup_tokens": 2}, PASSES * L, PASSES * L - (PASSES - 3) * 2),
    # skipped lower layers per decoded position: 0, 1, 1, then 2 (ramp of 4 tokens) from layer 1 upward
    "skipdecode": ({"max_skip": 2, "ramp_tokens": 4}, PASSES * L - 28, PASSES * L - 28),
    # always confident at layer 1: layers 2-4 skip their FFN; their attention still runs (KV by copy)
    "early-exit": ({"threshold": 1e-9, "exit_layers": "1"}, PASSES * L, L + NEW * 2),
    # routers skip layers 1 and 3 for the whole decode
    "first": ({"routers": SKIP_1_AND_3}, L + NEW * 3, L + NEW * 3),
}


def logits_of(model):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([PROMPT])).logits.clone()


def all_hooks(model) -> list:
    return [(name, key) for name, m in model.named_modules()
            for key in list(m._forward_pre_hooks) + list(m._forward_hooks)]


def count_calls(model) -> tuple[Counter, list]:
    calls: Counter = Counter()
    handles = [m.register_forward_pre_hook(lambda _m, _a, kind=kind: calls.update([kind]))
               for layer in decoder_layers(model) for kind, m in (("attn", layer.self_attn), ("ffn", layer.mlp))]
    return calls, handles


@pytest.mark.parametrize("method", sorted(CASES))
def test_lossy_method_runs_the_blocks_it_says_and_restores_the_model(arch, method):
    options, attn, ffn = CASES[method]
    target = tiny_loaded(arch, layers=L, scale=4.0)
    model = target.model
    before = logits_of(model)
    originals = [(l.self_attn, l.mlp) for l in decoder_layers(model)]
    hooks_before = all_hooks(model)  # transformers installs its own output-capturing hooks once, and keeps them
    decoder = Decoder(target, method, **options)
    calls, handles = count_calls(model)
    try:
        out = decoder.generate(PROMPT, max_new_tokens=NEW)
    finally:
        for h in handles:
            h.remove()
    assert out.stats.new_tokens == NEW
    assert (calls["attn"], calls["ffn"]) == (attn, ffn)
    assert [(l.self_attn, l.mlp) for l in decoder_layers(model)] == originals
    assert all_hooks(model) == hooks_before
    assert torch.equal(logits_of(model), before)
    assert decoder.generate(PROMPT, max_new_tokens=NEW).token_ids == out.token_ids  # deterministic


def test_ffn_skip_threshold_mode_and_early_exit_never_confident_equals_ar():
    target = tiny_loaded("llama", layers=L, scale=4.0)
    ref = Decoder(target, "ar").generate(PROMPT, max_new_tokens=NEW).token_ids
    assert Decoder(target, "early-exit", threshold=1.0).generate(PROMPT, max_new_tokens=NEW).token_ids == ref
    assert Decoder(target, "ffn-skip", threshold=0.999999).generate(PROMPT, max_new_tokens=NEW).token_ids == ref


@pytest.mark.parametrize("method,options,match", [
    ("ffn-skip", {"threshold": 1.5}, "threshold must be in"),
    ("ffn-skip", {"threshold": 0.0}, "threshold must be in"),
    ("ffn-skip", {"fraction": 1.0}, "fraction must be in"),
    ("ffn-skip", {"warmup_tokens": -1}, "warmup_tokens"),
    ("skipdecode", {"max_skip": 4}, "every layer"),
    ("skipdecode", {"max_skip": 2, "min_skip": 3}, "min_skip"),
    ("early-exit", {"threshold": 0.0}, "threshold must be in"),
    ("early-exit", {"threshold": 1.2}, "threshold must be in"),
    ("early-exit", {"exit_layers": [4]}, "exit_layers"),
    ("first", {}, "needs routers"),
    ("first", {"routers": SKIP_1_AND_3, "threshold": 1.0}, "threshold must be in"),
    ("first", {"routers": Routers.init(4, 64)}, "routers are for"),
    ("first", {"routers": Routers((1, 5), torch.zeros(2, 64), torch.zeros(2), L)}, r"name layers \[5\]"),
    ("first", {"routers": Routers((-1, 2), torch.zeros(2, 64), torch.zeros(2), L)}, r"name layers \[-1\]"),
    ("first", {"routers": Routers((2, 2), torch.zeros(2, 64), torch.zeros(2), L)}, "a layer twice"),
    ("first", {"routers": Routers((1, 2), torch.zeros(3, 64), torch.zeros(2), L)}, "weight"),
    ("first", {"routers": Routers.init(L, 64, layers=range(L))}, "at least one layer"),
    ("ffn-skip", {"nope": 1}, "no option"),
])
def test_lossy_methods_refuse_invalid_settings(method, options, match):
    target = tiny_loaded("llama", layers=L)
    with pytest.raises(InvalidSettingError, match=match):
        Decoder(target, method, **options)


def test_ffn_skip_needs_three_layers():
    with pytest.raises(InvalidSettingError, match="at least 3 layers"):
        Decoder(tiny_loaded("llama", layers=2), "ffn-skip")


def test_router_training_round_trip_and_model_unchanged(tmp_path):
    target = tiny_loaded("qwen2", layers=L, scale=4.0)
    model = target.model
    before = logits_of(model)
    flags = [p.requires_grad for p in model.parameters()]
    texts = [PROMPT + [5, 6, 7, 8], [2, 4, 6, 8, 10, 12, 14]]
    routers, report = train_routers(model, texts, steps=4, sparsity=1.0, lr=0.2,
                                    generator=torch.Generator().manual_seed(0))
    assert report.steps == 4 and report.last_loss < report.first_loss  # the sparsity term pulls gates down
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(logits_of(model), before)
    path = routers.save(tmp_path / "routers.pt")
    loaded = Routers.load(path)
    assert loaded.layers == (1, 2, 3) and torch.equal(loaded.weight, routers.weight)
    out = Decoder(target, "first", routers=str(path)).generate(PROMPT, max_new_tokens=8)
    assert out.stats.new_tokens == 8
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(InvalidSettingError, match="cannot read routers"):
        Decoder(target, "first", routers=str(tmp_path / "bad.pt"))


def test_router_file_that_could_skip_every_layer_is_refused(tmp_path):
    target = tiny_loaded("llama", layers=L)
    path = Routers(tuple(range(L)), torch.zeros(L, 64), torch.full((L,), -5.0), L).save(tmp_path / "all.pt")
    with pytest.raises(InvalidSettingError, match=f"can skip all {L} layers"):
        Decoder(target, "first", routers=str(path))
    torch.save({"kind": "leapdecode-first-routers", "layers": [1]}, tmp_path / "part.pt")
    with pytest.raises(InvalidSettingError, match="incomplete or malformed"):
        Decoder(target, "first", routers=str(tmp_path / "part.pt"))


def test_quality_metrics():
    assert lcs_length("abcde", "ace") == 3
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat", "a dog") == 0.0
    assert abs(rouge_l("the cat sat", "the cat ran") - 2 / 3) < 1e-9
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert prefix_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    assert task_score(["The answer is ten."], "Ten") == 1.0
    assert task_score(["It is 12."], "Ten") == 0.0
    assert task_score(["a", "b five c"], [["x"], ["five", "5"]]) == 0.0
    assert task_score(["x y", "b 5 c"], [["x"], ["five", "5"]]) == 1.0
    assert task_score(["anything"], None) is None


def test_bench_quality_columns_and_method_variants(tmp_path):
    questions = [Question(1, "copy", ["w1 w2 w3 w4 w5 w1 w2 w3"], reference="w1"),
                 Question(2, "chat", ["w20 w21", "w22 w23"])]
    methods = ["ar", "ffn-skip@fraction=0.4@warmup_tokens=1", "self-spec@draft_layers=2"]
    result = run_benchmark(tiny_loaded("llama", layers=L, scale=4.0), None, questions, methods,
                           BenchSettings(max_new_tokens=12), tmp_path / "out", progress=False, plots=True)
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == set(methods)
    quality_keys = {"token_agreement", "rouge_l", "task_score"}
    for name, m in summary["methods"].items():  # a run with a lossy method: quality keys for every method
        assert set(m) == {"tokens_per_s", "speedup", "mean_accepted", "identical_to_ar", "compared",
                          "peak_rss_mb", "by_category"} | quality_keys
    for lossless in ("ar", "self-spec@draft_layers=2"):  # agreement by promise; the task score is measured
        assert summary["methods"][lossless]["token_agreement"] is None is summary["methods"][lossless]["rouge_l"]
        assert summary["methods"][lossless]["task_score"] in (0.0, 1.0)
    lossy = summary["methods"]["ffn-skip@fraction=0.4@warmup_tokens=1"]
    assert 0.0 <= lossy["token_agreement"] <= 1.0 and 0.0 <= lossy["rouge_l"] <= 1.0
    assert lossy["task_score"] in (0.0, 1.0)  # one question has a reference
    quality = json.loads((out / "quality.json").read_text())["methods"]
    assert lossy["rouge_l"] == quality["ffn-skip@fraction=0.4@warmup_tokens=1"]["rouge_l"]
    table = result.table.splitlines()
    assert table[0].split()[-5:] == ["token", "agreement", "ROUGE-L", "task", "score"]
    assert len({len(line) for line in table}) == 1  # aligned
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert rows["ar"][-3:] == ["-", "-", f"{summary['methods']['ar']['task_score']:.3f}"]
    assert rows["ffn-skip@fraction=0.4@warmup_tokens=1"][-3] == f"{lossy['token_agreement']:.3f}"
    assert quality["ar"]["rouge_l"] == 1.0 and quality["ar"]["token_agreement"] == 1.0
    assert quality["self-spec@draft_layers=2"]["token_agreement"] == 1.0  # lossless
    assert quality["ar"]["task_questions"] == 1
    assert 0.0 <= quality["ffn-skip@fraction=0.4@warmup_tokens=1"]["rouge_l"] <= 1.0
    report = (out / "report.md").read_text()
    assert "## Quality against ar" in report and "speed_vs_quality.png" in report
    assert (out / "speed_vs_quality.png").stat().st_size > 0
    assert not result.mismatches
