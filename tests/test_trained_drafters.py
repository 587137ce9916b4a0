"""Trained drafters (medusa, hydra, falcon): training lowers the loss and round-trips through save/load; greedy
and sampled output stay exactly the target's through tree verification; a drafter for another model is
refused; the engine seam hands the target's final hidden states to the drafter."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from leapdecode import Decoder, SamplingParams
from leapdecode.errors import InvalidSettingError
from leapdecode.lm import CausalLM
from leapdecode.drafters.checkpoint import (DrafterConfig, load_drafter, make_module, read_config, save_drafter,
                                            target_facts, target_fingerprint)
from leapdecode.training.data import build_data, builtin_prompts
from leapdecode.training.trainer import TrainSettings, train
from leapdecode.tree import DraftTree
from conftest import tiny_loaded
from test_sampling import chi_square_pvalue, exact_distribution

# a variant is a drafter kind with settings; "hydra++" is hydra with Hydra++'s extra decoder layer
KINDS = ("medusa", "hydra", "hydra++", "falcon")
KIND = {"hydra++": "hydra"}
SETTINGS = {"medusa": {"num_heads": 3}, "hydra": {"num_heads": 3}, "hydra++": {"num_heads": 3, "prefix_window": 6},
            "falcon": {"window": 8}}
OPTIONS = {"medusa": {"paths": "0;1;2;0,0;0,1;1,0;0,0,0"}, "hydra": {"paths": "0;1;2;0,0;0,1;1,0;0,0,0"},
           "hydra++": {"paths": "0;1;2;0,0;0,1;1,0;0,0,0"}, "falcon": {"max_nodes": 8, "top_k": 3}}


def kind_of(variant: str) -> str:
    return KIND.get(variant, variant)


def fresh_drafter(kind: str, target, folder: Path, seed: int = 0) -> Path:
    hidden, vocab = target_facts(target.model)
    settings = dict(SETTINGS.get(kind, {}))
    if kind == "hidden-transfer":  # the split of the target's layers: the upper half
        from leapdecode.layer_skip import num_layers

        total = num_layers(target.model)
        settings.update(num_heads=3, transfer_layer=total // 2, num_layers=total)
    config = DrafterConfig(kind=kind_of(kind), hidden_size=hidden, vocab_size=vocab,
                           target_fingerprint=target_fingerprint(target.model), target_name=target.name,
                           settings=settings)
    torch.manual_seed(seed)
    net = make_module(config)
    with torch.no_grad():  # random, not identity, so drafts differ from the target's own choice
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return save_drafter(folder, net, config)


def tiny_data(target, folder: Path, n: int = 8, new: int = 24):
    rows = [{"messages": [{"role": "user", "content": " ".join(f"w{(i * 7 + j) % 64}" for j in range(5))}],
             "response": None} for i in range(n)]
    return build_data(target, rows, folder, target_fingerprint(target.model), max_new_tokens=new, batch_size=4,
                      progress=False)


def test_hidden_states_are_final_norm_outputs(arch):
    """`keep_hidden` gives the hidden states the LM head reads: lm_head(last_hidden) == logits."""
    target = tiny_loaded(arch)
    lm = CausalLM(target.model)
    lm.keep_hidden = True
    with torch.inference_mode():
        logits = lm.forward(torch.tensor([[1, 2, 3, 4]]))
        assert lm.last_hidden.shape == (1, 4, 64)
        head = target.model.get_output_embeddings()
        torch.testing.assert_close(head(lm.last_hidden), logits, rtol=1e-4, atol=1e-4)
        tree = DraftTree(tokens=torch.tensor([[5, 6, 7]]), parents=(-1, -1, 0))
        logits = lm.score_tree(torch.tensor([[4]]), tree)
        assert lm.last_hidden.shape == (1, 4, 64)
        torch.testing.assert_close(head(lm.last_hidden), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_loss_and_round_trips(kind, tmp_path):
    target = tiny_loaded("llama", scale=3.0)
    data = tiny_data(target, tmp_path)
    hidden, vocab = target_facts(target.model)
    config = DrafterConfig(kind=kind_of(kind), hidden_size=hidden, vocab_size=vocab,
                           target_fingerprint=target_fingerprint(target.model), settings=SETTINGS[kind])
    torch.manual_seed(0)
    net = make_module(config)
    loss_fn = None
    if kind == "falcon":
        from leapdecode.drafters.falcon import falcon_loss_fn

        loss_fn = falcon_loss_fn(net, target, data, "ce")
    report = train(net, target, data, TrainSettings(epochs=25, lr=3e-3, batch_size=32, progress=False,
                                                   objective="distill" if kind_of(kind) == "hydra" else "ce"),
                   tmp_path / "run", loss_fn=loss_fn)
    assert report.last_loss < 0.7 * report.first_loss, report
    save_drafter(tmp_path / "d", net, config)
    assert read_config(tmp_path / "d").kind == kind_of(kind)
    _, loaded = load_drafter(tmp_path / "d", target.model, kind=kind_of(kind))
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    # the trained drafter drafts tokens the target accepts, on a training prompt
    # whole trees (fit_width=False): the width policy's cut depends on measured pass times, not on the drafter
    dec = Decoder(target, kind_of(kind), drafter=str(tmp_path / "d"), fit_width=False, **OPTIONS[kind])
    prompt = [int(i) for i in target.tokenizer("w0 w7 w14 w21 w28")["input_ids"]]
    out = dec.generate(prompt, max_new_tokens=24)
    assert out.token_ids == Decoder(target, "ar").generate(prompt, max_new_tokens=24).token_ids
    assert sum(out.stats.accept_lengths) / len(out.stats.accept_lengths) > 1.5


def test_resume_from_checkpoint(tmp_path):
    target = tiny_loaded("llama", scale=3.0)
    data = tiny_data(target, tmp_path, n=4)
    config = DrafterConfig(kind="medusa", hidden_size=64, vocab_size=64,
                           target_fingerprint=target_fingerprint(target.model), settings={"num_heads": 2})
    settings = TrainSettings(epochs=4, batch_size=16, checkpoint_every=2, progress=False)
    first = train(make_module(config), target, data, settings, tmp_path / "run")
    again = train(make_module(config), target, data, settings, tmp_path / "run")
    assert again.resumed_from == first.steps and again.steps == first.steps


def test_interrupted_training_resumes_exactly(tmp_path):
    """Stopped mid-epoch, a run resumes from its last checkpoint in the same order of positions and ends
    with the weights of an uninterrupted run; a checkpoint of another drafter is not loaded."""
    from leapdecode.training.trainer import head_loss

    target = tiny_loaded("llama", scale=3.0)
    data = tiny_data(target, tmp_path, n=4)
    config = DrafterConfig(kind="hydra", hidden_size=64, vocab_size=64,
                           target_fingerprint=target_fingerprint(target.model), settings={"num_heads": 2})
    settings = TrainSettings(epochs=3, batch_size=16, checkpoint_every=3, progress=False)
    model = target.model
    lm_head, embed = model.get_output_embeddings(), model.get_input_embeddings()

    def fresh():
        torch.manual_seed(0)
        return make_module(config)

    def loss_fn(net, stop_after=None):
        calls = []

        def fn(idx):
            calls.append(1)
            if stop_after is not None and len(calls) > stop_after:
                raise KeyboardInterrupt
            return head_loss(net, data, data.ends(), idx, lm_head, embed, 0.8, "ce", "cpu")
        return fn

    whole = fresh()
    report = train(whole, target, data, settings, tmp_path / "whole", loss_fn=loss_fn(whole))
    assert report.steps > 8
    broken = fresh()
    with pytest.raises(KeyboardInterrupt):
        train(broken, target, data, settings, tmp_path / "split", loss_fn=loss_fn(broken, stop_after=7))
    resumed = fresh()
    again = train(resumed, target, data, settings, tmp_path / "split", loss_fn=loss_fn(resumed))
    assert again.resumed_from == 6 and again.steps == report.steps
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    other = DrafterConfig(kind="medusa", hidden_size=64, vocab_size=64, target_fingerprint="x",
                          settings={"num_heads": 2})
    assert train(make_module(other), target, data, settings, tmp_path / "split").resumed_from == 0


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_output_equals_ar(kind, arch, tmp_path):
    target = tiny_loaded(arch, scale=3.0)
    folder = fresh_drafter(kind, target, tmp_path / kind)
    ar = Decoder(target, "ar")
    dec = Decoder(target, kind_of(kind), drafter=str(folder), **OPTIONS[kind])
    for prompt in ([1, 2, 3], [5, 9, 5, 9, 5, 9, 2], [7] * 11):
        want = ar.generate(prompt, max_new_tokens=30).token_ids
        got = dec.generate(prompt, max_new_tokens=30)
        assert got.token_ids == want
        assert got.stats.drafted_tokens > 0


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_follows_target_distribution(kind, tmp_path):
    """First three tokens of seeded generations vs the exact distribution (a branching tree at step 2)."""
    target = tiny_loaded("llama", vocab_size=8, seed=0, scale=3.0)  # peaked enough for a chi-square test
    folder = fresh_drafter(kind, target, tmp_path / kind)
    params = SamplingParams(temperature=1.0)
    dec = Decoder(target, kind_of(kind), drafter=str(folder), **OPTIONS[kind])
    prompt, runs = [1, 2, 3, 1, 2], 1000
    counts: Counter = Counter()
    branched = 0
    for seed in range(runs):
        out = dec.generate(prompt, max_new_tokens=4, temperature=1.0, seed=seed)
        counts[tuple(out.token_ids[:3])] += 1
        branched += out.stats.drafted_tokens >= 2
    assert branched == runs
    dist = {}
    for seq, p in exact_distribution(target, prompt, params).items():
        dist[seq] = p
    assert chi_square_pvalue(counts, dist, runs) > 1e-3


def test_draft_vocab_logits_and_frequent_tokens():
    from leapdecode.drafters.draft_vocab import DraftVocab, frequent_tokens

    assert frequent_tokens(torch.tensor([5, 3, 5, 9, 3, 5, 1]), 2).tolist() == [3, 5]
    assert frequent_tokens(torch.tensor([5, 3]), 10).tolist() == [3, 5]
    head = torch.nn.Linear(16, 50, bias=True)
    vocab = DraftVocab(head, torch.tensor([3, 7, 11]))
    vocab.begin([7, 20, 20])
    states = torch.randn(4, 16)
    got = vocab.logits(states)
    want = head(states)
    keep = torch.tensor([3, 7, 11, 20])
    torch.testing.assert_close(got[:, keep], want[:, keep].detach())
    assert torch.isinf(got).sum() == 4 * (50 - 4)
    with pytest.raises(ValueError):
        DraftVocab(head, torch.tensor([50]))


@pytest.mark.parametrize("kind", ["medusa", "hydra", "falcon"])
def test_draft_vocab_keeps_output_exact(kind, arch, tmp_path):
    """With a draft vocabulary the drafter proposes only its ids and the prompt's; output is still exactly
    the target's, greedy (three architectures) and sampled."""
    from leapdecode.drafters.checkpoint import save_draft_vocab

    target = tiny_loaded(arch, scale=3.0)
    folder = fresh_drafter(kind, target, tmp_path / kind)
    save_draft_vocab(folder, torch.arange(10, 40))
    ar = Decoder(target, "ar")
    dec = Decoder(target, kind, drafter=str(folder), **OPTIONS[kind])
    proposed: set[int] = set()
    inner = dec.drafter.propose

    def propose(ctx):
        tree = inner(ctx)
        if tree is not None:
            proposed.update(tree.tokens[0].tolist())
        return tree

    dec.drafter.propose = propose
    for prompt in ([1, 2, 3], [5, 9, 5, 9, 5, 9, 2], [7] * 11):
        assert dec.generate(prompt, max_new_tokens=30).token_ids == ar.generate(prompt, max_new_tokens=30).token_ids
    assert proposed and proposed <= set(range(10, 40)) | {1, 2, 3, 5, 7, 9}
    no_vocab = Decoder(target, kind, drafter=str(folder), draft_vocab=False, **OPTIONS[kind])
    assert no_vocab.drafter.vocab is None
    if arch == "llama":  # sampling: the exact distribution of the first three tokens
        small = tiny_loaded("llama", vocab_size=8, seed=0, scale=3.0)
        folder = fresh_drafter(kind, small, tmp_path / f"{kind}-small")
        save_draft_vocab(folder, torch.tensor([0, 4, 6]))
        dec = Decoder(small, kind, drafter=str(folder), **OPTIONS[kind])
        prompt, runs = [1, 2, 3, 1, 2], 1000
        counts: Counter = Counter()
        for seed in range(runs):
            counts[tuple(dec.generate(prompt, max_new_tokens=4, temperature=1.0, seed=seed).token_ids[:3])] += 1
        dist = exact_distribution(small, prompt, SamplingParams(temperature=1.0))
        assert chi_square_pvalue(counts, dist, runs) > 1e-3


def test_drafter_for_another_model_is_refused(tmp_path):
    target = tiny_loaded("llama", seed=0)
    folder = fresh_drafter("hydra", target, tmp_path / "h")
    with pytest.raises(InvalidSettingError, match="not for this target's weights"):
        Decoder(tiny_loaded("llama", seed=1), "hydra", drafter=str(folder))
    with pytest.raises(InvalidSettingError, match="vocabulary of 64 tokens"):
        Decoder(tiny_loaded("llama", vocab_size=32), "hydra", drafter=str(folder))
    with pytest.raises(InvalidSettingError, match="not a medusa drafter"):
        Decoder(target, "medusa", drafter=str(folder))
    with pytest.raises(InvalidSettingError, match="not a trained drafter"):
        Decoder(target, "hydra", drafter=str(tmp_path))
    config = json.loads((folder / "drafter.json").read_text())
    config["hidden_size"] = 128
    (folder / "drafter.json").write_text(json.dumps(config))
    with pytest.raises(InvalidSettingError, match="hidden size 128"):
        Decoder(target, "hydra", drafter=str(folder))


def test_builtin_prompts_are_disjoint_from_the_suite():
    suite = Path(__file__).resolve().parents[1] / "benchmarks" / "suite.jsonl"
    questions = {json.loads(line)["turns"][0].strip() for line in suite.read_text().splitlines() if line.strip()}
    prompts = builtin_prompts(500)
    assert len(prompts) == 500 and len(set(prompts)) > 300
    assert not questions & {p.strip() for p in prompts}


def test_cli_registers_training_commands():
    from leapdecode.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train-drafter", "--kind", "medusa", "--self-distill", "10", "--out", "x"])
    assert args.kind == "medusa" and args.self_distill == 10
    args = parser.parse_args(["distill-draft", "--model", "a", "--draft-model", "b", "--out", "x"])
    assert args.func.__name__ == "cmd_distill_draft"


def test_train_drafter_command_end_to_end(tmp_path, monkeypatch, capsys):
    """`leapdecode train-drafter` on a tiny model folder: saves a drafter that `generate --drafter` uses and
    that becomes the model's default; a second run (another kind) reuses the cached self-distillation data."""
    from leapdecode.cli import main

    monkeypatch.setenv("LEAPDECODE_CACHE", str(tmp_path / "cache"))
    target = tiny_loaded("llama", scale=3.0)
    model_dir = tmp_path / "model"
    target.model.save_pretrained(model_dir)
    target.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    common = ["--model", str(model_dir), "--self-distill", "4", "--max-new-tokens", "12", "--epochs", "2",
              "--batch-size", "8", "--out", str(out), "--no-progress", "--gen-batch-size", "2"]
    assert main(["train-drafter", "--kind", "hydra", "--prefix-window", "4", *common]) == 0
    config = json.loads((out / "drafter.json").read_text())
    assert config["kind"] == "hydra" and config["settings"]["prefix_window"] == 4
    assert config["training"]["answers"] == 4
    assert 0 < config["training"]["draft_vocab"] <= 48 and (out / "draft_vocab.safetensors").is_file()
    shards = {f: f.stat().st_mtime_ns for f in out.glob("data-*/shard-*.safetensors")}
    assert len(shards) == 2
    assert main(["generate", "w1 w2 w3", "--model", str(model_dir), "--method", "hydra", "--drafter", str(out),
                 "--max-new-tokens", "8"]) == 0
    assert main(["generate", "w1 w2 w3", "--model", str(model_dir), "--method", "hydra",  # the default drafter
                 "--max-new-tokens", "8"]) == 0
    assert main(["train-drafter", "--kind", "medusa", *common]) == 0
    assert {f: f.stat().st_mtime_ns for f in out.glob("data-*/shard-*.safetensors")} == shards
    assert "checkpoint of another run" in capsys.readouterr().err
    assert json.loads((out / "drafter.json").read_text())["kind"] == "medusa"
    assert main(["train-drafter", "--kind", "medusa", "--prefix-window", "4", *common]) == 2  # hydra only


def test_tvdpp_distillation_lowers_total_variation(tmp_path):
    import copy
    import dataclasses

    from leapdecode.training.distill import distill, total_variation, tvdpp_loss

    target = tiny_loaded("llama", scale=3.0)
    base = tiny_loaded("llama", seed=2, layers=1)
    draft = dataclasses.replace(base, model=copy.deepcopy(base.model))  # the cached tiny model stays untouched
    data = tiny_data(target, tmp_path, n=8)
    prompts = [[int(i) for i in target.tokenizer(" ".join(f"w{(i * 7 + j) % 64}" for j in range(5)))["input_ids"]]
               for i in range(8)]
    responses = [data.tokens[data.starts[i]: data.starts[i + 1]].tolist() for i in range(data.samples)]
    report = distill(target, draft, prompts, responses, tmp_path / "d", epochs=30, lr=3e-3, batch_size=4,
                     progress=False)
    assert report.last_tvd < 0.8 * report.first_tvd, report
    # the loss's gradient raises log q where the target puts more mass than the draft
    logits_q = torch.zeros(1, 2, 4, requires_grad=True)
    logits_p = torch.tensor([[[3.0, 0, 0, 0], [0, 0, 0, 3.0]]])
    tvdpp_loss(logits_q, logits_p, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool)).backward()
    assert logits_q.grad[0, 0, 0] < 0 and logits_q.grad[0, 1, 1] > 0
    assert total_variation(logits_p, logits_p, torch.ones(1, 2, dtype=torch.bool)) == 0.0


@pytest.mark.parametrize("stop_after", [4, 5])  # at an epoch's end (2 batches an epoch) and inside one
def test_interrupted_distillation_resumes_exactly(tmp_path, monkeypatch, stop_after):
    import copy
    import dataclasses

    from leapdecode.training import distill as distill_module

    target = tiny_loaded("llama", scale=3.0)
    base = tiny_loaded("llama", seed=2, layers=1)
    data = tiny_data(target, tmp_path, n=4)
    prompts = [[1, 2, 3 + i] for i in range(4)]
    responses = [data.tokens[data.starts[i]: data.starts[i + 1]].tolist() for i in range(data.samples)]
    loss = distill_module.tvdpp_loss

    def run(out, interrupt_after=None):
        draft = dataclasses.replace(base, model=copy.deepcopy(base.model))
        calls = []

        def counted(*args, **kwargs):
            calls.append(1)
            if interrupt_after is not None and len(calls) > interrupt_after:
                raise KeyboardInterrupt
            return loss(*args, **kwargs)

        monkeypatch.setattr(distill_module, "tvdpp_loss", counted)
        report = distill_module.distill(target, draft, prompts, responses, out, epochs=4, lr=3e-3, batch_size=2,
                                        checkpoint_every=stop_after, progress=False)
        return draft.model, report

    whole, report = run(tmp_path / "whole")
    assert report.steps == 8
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split", interrupt_after=stop_after + 1)
    resumed, again = run(tmp_path / "split")
    assert again.steps == 8
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_hydra_prefix_layer_sees_what_training_saw(tmp_path):
    """Hydra++'s extra layer: the feature the drafter computes after each verification step equals the one
    training computes for the same position from the stored features (same window, same alignment)."""
    from leapdecode.drafters.base import DraftFeedback
    from leapdecode.drafters.hydra import HydraDrafter

    target = tiny_loaded("llama", scale=3.0)
    data = tiny_data(target, tmp_path, n=2, new=16)
    config = DrafterConfig(kind="hydra", hidden_size=64, vocab_size=64,
                           target_fingerprint=target_fingerprint(target.model), settings={"prefix_window": 4})
    torch.manual_seed(0)
    net = make_module(config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    drafter = HydraDrafter(target, net, paths="chain:3")
    drafter.begin([1, 2], SamplingParams())
    feats = data.features[: int(data.starts[1])].float()  # the first sample: f_0 .. f_{L-1}
    position = -1
    for accepted in (0, 2, 1, 3, 0, 2):  # nodes accepted per step (chain of 3 proposed after the first)
        proposed = 0 if position < 0 else 3
        rows = feats[position + 1: position + 2 + proposed]
        if len(rows) < 1 + proposed:
            break
        drafter.update(DraftFeedback(proposed=proposed, accepted=accepted, accepted_nodes=list(range(accepted)),
                                     target_hidden=rows[None]))
        position += 1 + accepted
        window, valid = data.windows(torch.tensor([position]), 4)
        with torch.no_grad():
            want = net.enhance(window.float(), valid)[0]
        torch.testing.assert_close(drafter.feature, want, rtol=1e-5, atol=1e-5)
    assert position >= 6


def test_prefix_window_is_validated():
    from leapdecode.drafters.hydra import HydraHeads

    with pytest.raises(ValueError, match="prefix_window"):
        HydraHeads(64, prefix_window=-1)
