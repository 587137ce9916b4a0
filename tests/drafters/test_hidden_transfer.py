"""`hidden-transfer`: the upper-layer pass finishes the target's computation exactly; greedy output equals `ar`
on llama, qwen2 and gemma3 (untrained and briefly trained transfer layers), alone and in the batch engine;
sampled output follows the target's distribution; training lowers the loss, resumes exactly and refuses a
checkpoint of another split; a drafter for another model is refused; `train-drafter --kind hidden-transfer`."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from leapdecode import Decoder, SamplingParams
from leapdecode.drafters.checkpoint import DrafterConfig, make_module, save_drafter, target_facts, target_fingerprint
from leapdecode.drafters.hidden_transfer import hidden_transfer_loss_fn, upper_layers
from leapdecode.errors import InvalidSettingError
from leapdecode.training.data import encode_row
from leapdecode.training.trainer import TrainSettings, train
from conftest import tiny_loaded
from test_sampling import chi_square_pvalue, exact_distribution
from test_trained_drafters import fresh_drafter

PATHS = "0;1;2;0,0;0,1;1,0;0,0,0"
LAYERS = 3  # transfer layer 1 or 2: lower and upper parts of one and two layers


def prompts_rows(n: int = 8):
    return [{"messages": [{"role": "user", "content": " ".join(f"w{(i * 7 + j) % 64}" for j in range(5))}],
             "response": None} for i in range(n)]


def config_for(target, transfer_layer: int = 1, heads: int = 3) -> DrafterConfig:
    from leapdecode.layer_skip import num_layers

    hidden, vocab = target_facts(target.model)
    return DrafterConfig(kind="hidden-transfer", hidden_size=hidden, vocab_size=vocab,
                         target_fingerprint=target_fingerprint(target.model), target_name=target.name,
                         settings={"num_heads": heads, "transfer_layer": transfer_layer,
                                   "num_layers": num_layers(target.model)})


def trained(target, folder, epochs: float = 6, transfer_layer: int = 1):
    """Transfer layers trained briefly on the target's own answers; (net, report)."""
    from leapdecode.training.data import build_data

    rows = prompts_rows()
    data = build_data(target, rows, folder, target_fingerprint(target.model), max_new_tokens=24, batch_size=4,
                      progress=False)
    config = config_for(target, transfer_layer)
    torch.manual_seed(0)
    net = make_module(config)
    loss_fn = hidden_transfer_loss_fn(net, target, data, [encode_row(target, r) for r in rows], "ce")
    report = train(net, target, data, TrainSettings(epochs=epochs, lr=3e-3, batch_size=16, progress=False),
                   folder / "run", loss_fn=loss_fn)
    save_drafter(folder / "d", net, config)
    return net, report


@pytest.mark.parametrize("layer", [1, 2])
def test_upper_layers_finish_the_target_pass(arch, layer):
    """The inputs of layer L, fed through the upper layers alone, give the target's final hidden states."""
    target = tiny_loaded(arch, layers=LAYERS)
    ids = torch.tensor([[1, 5, 7, 9, 3, 2, 8, 11, 4, 6]])  # longer than gemma3's sliding window (6)
    with torch.no_grad():
        out = target.model(input_ids=ids, output_hidden_states=True)
        final = upper_layers(target.model, layer, out.hidden_states[layer], torch.arange(10)[None])
    torch.testing.assert_close(final, out.hidden_states[-1], rtol=1e-5, atol=1e-5)
    assert not any(type(l.self_attn).__name__ == "GatedAttention" for l in target.model.model.layers)


def test_greedy_output_equals_ar(arch, tmp_path):
    """Untrained (identity-started, then perturbed) transfer layers: drafts are proposed, output is ar's."""
    target = tiny_loaded(arch, layers=LAYERS, scale=3.0)
    folder = fresh_drafter("hidden-transfer", target, tmp_path / "ht")
    ar = Decoder(target, "ar")
    dec = Decoder(target, "hidden-transfer", drafter=str(folder), paths=PATHS)
    for prompt in ([1, 2, 3], [5, 9, 5, 9, 5, 9, 2], [7] * 11, [4]):
        want = ar.generate(prompt, max_new_tokens=30).token_ids
        got = dec.generate(prompt, max_new_tokens=30)
        assert got.token_ids == want
        assert got.stats.drafted_tokens > 0
    chain = Decoder(target, "hidden-transfer", drafter=str(folder), paths="chain:3")  # the CPU default's shape
    assert chain.generate([5, 9, 5, 9], max_new_tokens=20).token_ids == ar.generate([5, 9, 5, 9],
                                                                                    max_new_tokens=20).token_ids


def test_training_lowers_loss_and_trained_drafts_are_accepted(arch, tmp_path):
    """Briefly trained transfer layers: the loss falls, the drafter is accepted more than once per pass on a
    training prompt, and greedy output is still exactly ar's."""
    target = tiny_loaded(arch, layers=LAYERS, scale=3.0)
    _, report = trained(target, tmp_path)
    assert report.last_loss < 0.9 * report.first_loss, report
    ar = Decoder(target, "ar")
    dec = Decoder(target, "hidden-transfer", drafter=str(tmp_path / "d"), paths=PATHS, fit_width=False)
    prompt = encode_row(target, prompts_rows()[0])
    out = dec.generate(prompt, max_new_tokens=24)
    assert out.token_ids == ar.generate(prompt, max_new_tokens=24).token_ids
    assert sum(out.stats.accept_lengths) / len(out.stats.accept_lengths) > 1.2
    for prompt in ([1, 2, 3], [7] * 11):
        assert dec.generate(prompt, max_new_tokens=30).token_ids == ar.generate(prompt, max_new_tokens=30).token_ids


def test_sampling_follows_target_distribution(tmp_path):
    """First three tokens of seeded generations vs the exact distribution (a branching tree at step 2)."""
    target = tiny_loaded("llama", vocab_size=8, seed=0, layers=LAYERS, scale=3.0)
    folder = fresh_drafter("hidden-transfer", target, tmp_path / "ht")
    dec = Decoder(target, "hidden-transfer", drafter=str(folder), paths=PATHS)
    prompt, runs = [1, 2, 3, 1, 2], 1000
    counts: Counter = Counter()
    branched = 0
    for seed in range(runs):
        out = dec.generate(prompt, max_new_tokens=4, temperature=1.0, seed=seed)
        counts[tuple(out.token_ids[:3])] += 1
        branched += out.stats.drafted_tokens >= 2
    assert branched == runs
    dist = exact_distribution(target, prompt, SamplingParams(temperature=1.0))
    assert chi_square_pvalue(counts, dist, runs) > 1e-3


def test_batch_engine_rows_equal_decoding_alone(tmp_path):
    """In the batch engine a hidden-transfer row reads the inputs of its layer from the shared pass while a
    hydra row reads the final states and an ar row none: each equals its request decoded alone."""
    from leapdecode.batching import BatchEngine
    from leapdecode.engine import _settings

    target = tiny_loaded("llama", layers=LAYERS, scale=3.0)
    methods = {"ar": {}, "hidden-transfer": {"drafter": str(fresh_drafter("hidden-transfer", target, tmp_path / "h")),
                                             "paths": PATHS},
               "hydra": {"drafter": str(fresh_drafter("hydra", target, tmp_path / "y")), "paths": PATHS}}
    engine = BatchEngine(target, methods, max_batch_size=4, step_draft_budget=64, fit_width=False)
    jobs = []
    for i, (prompt, name) in enumerate([([1, 2, 3], "hidden-transfer"), ([5, 9, 5, 9], "hydra"),
                                        ([7] * 6, "hidden-transfer"), ([4, 8], "ar")]):
        kw = dict(max_new_tokens=16, temperature=0.8, seed=3) if i == 2 else dict(max_new_tokens=16)
        jobs.append((prompt, name, kw, engine.submit(prompt, name, _settings(**kw))))
    engine.run_until_done()
    for prompt, name, kw, handle in jobs:
        assert handle.error is None
        alone = Decoder(target, name, fit_width=False, **methods[name]).generate(prompt, **kw)
        assert handle.result.token_ids == alone.token_ids, name
        assert handle.result.stats.accept_lengths == alone.stats.accept_lengths, name


def test_interrupted_training_resumes_exactly(tmp_path):
    """Stopped mid-run, training resumes from its checkpoint and ends with an uninterrupted run's weights;
    a checkpoint of another transfer layer (same shapes) is not resumed."""
    from leapdecode.training.data import build_data

    target = tiny_loaded("llama", layers=LAYERS, scale=3.0)
    rows = prompts_rows(4)
    data = build_data(target, rows, tmp_path, target_fingerprint(target.model), max_new_tokens=24, batch_size=4,
                      progress=False)
    prompts = [encode_row(target, r) for r in rows]
    settings = TrainSettings(epochs=4, batch_size=16, checkpoint_every=3, progress=False)

    def fresh(layer=1):
        torch.manual_seed(0)
        return make_module(config_for(target, layer))

    def loss_fn(net, stop_after=None):
        inner = hidden_transfer_loss_fn(net, target, data, prompts, "ce")
        calls = []

        def fn(idx):
            calls.append(1)
            if stop_after is not None and len(calls) > stop_after:
                raise KeyboardInterrupt
            return inner(idx)
        return fn

    whole = fresh()
    report = train(whole, target, data, settings, tmp_path / "whole", loss_fn=loss_fn(whole))
    assert report.steps > 6
    broken = fresh()
    with pytest.raises(KeyboardInterrupt):
        train(broken, target, data, settings, tmp_path / "split", loss_fn=loss_fn(broken, stop_after=4))
    resumed = fresh()
    again = train(resumed, target, data, settings, tmp_path / "split", loss_fn=loss_fn(resumed))
    assert again.resumed_from == 3 and again.steps == report.steps
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    other = fresh(layer=2)
    assert train(other, target, data, settings, tmp_path / "split", loss_fn=loss_fn(other)).resumed_from == 0


def test_drafter_for_another_model_is_refused(tmp_path):
    target = tiny_loaded("llama", layers=LAYERS)
    folder = fresh_drafter("hidden-transfer", target, tmp_path / "h")
    with pytest.raises(InvalidSettingError, match="not for this target's weights"):
        Decoder(tiny_loaded("llama", seed=1, layers=LAYERS), "hidden-transfer", drafter=str(folder))
    with pytest.raises(InvalidSettingError, match="not a hydra drafter"):
        Decoder(target, "hydra", drafter=str(folder))
    with pytest.raises(ValueError, match="transfer_layer"):
        make_module(config_for(target, transfer_layer=LAYERS))


def test_method_is_listed_lossless():
    from leapdecode.methods import get_method

    spec = get_method("hidden-transfer")
    assert spec.promise == "lossless" and spec.target_patch is None
    with pytest.raises(InvalidSettingError):  # the judge reads final hidden states, this drafter's pass layer L's
        get_method("hidden-transfer+judge")
    assert get_method("hidden-transfer+typical").promise == "lossy"


def test_train_drafter_command(tmp_path, monkeypatch):
    """`leapdecode train-drafter --kind hidden-transfer` saves transfer layers (and a draft vocabulary) that
    `generate` uses, by folder and as the model's default; --transfer-layer is checked."""
    from leapdecode.cli import main

    monkeypatch.setenv("LEAPDECODE_CACHE", str(tmp_path / "cache"))
    target = tiny_loaded("llama", layers=LAYERS, scale=3.0)
    model_dir = tmp_path / "model"
    target.model.save_pretrained(model_dir)
    target.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    common = ["--model", str(model_dir), "--self-distill", "4", "--max-new-tokens", "12", "--epochs", "2",
              "--batch-size", "8", "--out", str(out), "--no-progress", "--gen-batch-size", "2"]
    assert main(["train-drafter", "--kind", "hidden-transfer", "--transfer-layer", "2", *common]) == 0
    config = json.loads((out / "drafter.json").read_text())
    assert config["kind"] == "hidden-transfer"
    assert config["settings"] == {"num_heads": 3, "transfer_layer": 2, "num_layers": LAYERS}
    assert config["training"]["answers"] == 4 and (out / "draft_vocab.safetensors").is_file()
    for extra in (["--drafter", str(out)], []):  # by folder, then the model's default
        assert main(["generate", "w1 w2 w3", "--model", str(model_dir), "--method", "hidden-transfer", *extra,
                     "--max-new-tokens", "8"]) == 0
    assert main(["train-drafter", "--kind", "hidden-transfer", "--transfer-layer", "3", *common]) == 2
    assert main(["train-drafter", "--kind", "hydra", "--transfer-layer", "1", *common]) == 2


def test_exact_runtime_output_equals_ar(arch, tmp_path):
    """On the exact int4 runtime (row-invariant passes), the drafter's extra call through the upper layers and
    its own cache leave the target's output bitwise ar's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
    from conftest import runtime_loaded
    from test_exactness import random_prompts

    target = runtime_loaded(arch, layers=LAYERS)
    assert target.runtime.exact
    folder = fresh_drafter("hidden-transfer", target, tmp_path / "ht")
    ar = Decoder(target, "ar")
    dec = Decoder(target, "hidden-transfer", drafter=str(folder), paths=PATHS)
    drafted = 0
    for prompt in random_prompts(5, n=4):
        got = dec.generate(prompt, max_new_tokens=24)
        assert got.token_ids == ar.generate(prompt, max_new_tokens=24).token_ids, prompt
        drafted += got.stats.drafted_tokens
    assert drafted > 0
