"""Momentum decoding and its peer, contrastive search, on tiny random models."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_loaded
from leapdecode import Decoder
from leapdecode.errors import InvalidSettingError
from leapdecode.lossy.contrastive import choose
from leapdecode.bench.diverse import rep_n
from leapdecode.lossy.momentum import MomentumRule

PROMPT = [3, 7, 3, 7, 5]


def test_zero_resistance_is_greedy(arch):
    model = tiny_loaded(arch, scale=4.0)
    greedy = Decoder(model, method="ar").generate(PROMPT, max_new_tokens=40)
    momentum = Decoder(model, method="momentum", resistance=0).generate(PROMPT, max_new_tokens=40)
    assert momentum.token_ids == greedy.token_ids
    assert momentum.stats.target_forward_passes == greedy.stats.target_forward_passes


def test_resistance_reduces_repetition():
    model = tiny_loaded("llama", scale=4.0)
    greedy = Decoder(model, method="ar").generate(PROMPT, max_new_tokens=60)
    assert rep_n(greedy.token_ids, 4) > 0.3  # the sharp tiny model loops
    momentum = Decoder(model, method="momentum", resistance=1.0).generate(PROMPT, max_new_tokens=60)
    assert len(momentum.token_ids) == 60
    assert rep_n(momentum.token_ids, 4) < rep_n(greedy.token_ids, 4) / 2
    assert momentum.stats.target_forward_passes == greedy.stats.target_forward_passes  # one pass per token


def test_rule_takes_a_new_node_greedily_and_penalises_returns():
    rule = MomentumRule(resistance=0.5, ngram=2, top_k=2)
    logits = torch.tensor([0.0, 2.0, 1.9, -5.0])
    # nodes so far: (1, 1) visited once -> the top token 1 would return to it; token 2 leads to a new node
    out = rule([9, 1, 1], 1, logits)
    assert int(torch.argmax(out)) == 2
    assert torch.equal(rule([9, 1, 1, 2], 1, logits), logits)  # (2, 1) is new: greedy, untouched


def test_momentum_options_are_checked():
    model = tiny_loaded("llama")
    with pytest.raises(InvalidSettingError):
        Decoder(model, method="momentum", resistance=-1)
    with pytest.raises(InvalidSettingError):
        Decoder(model, method="momentum", nope=1)


def test_momentum_in_the_batch_engine_equals_the_decoder():
    from leapdecode.batching.scheduler import BatchEngine

    model = tiny_loaded("qwen2", scale=4.0)
    alone = Decoder(model, method="momentum").generate(PROMPT, max_new_tokens=30)
    engine = BatchEngine(model, methods={"momentum": {}})
    assert engine.generate(PROMPT, method="momentum", max_new_tokens=30).token_ids == alone.token_ids


# ----- contrastive search -----------------------------------------------------------------------------

def _reference_contrastive(model, prompt: list[int], steps: int, alpha: float, k: int) -> list[int]:
    """The paper's definition, without a cache: every candidate's hidden state from a full forward pass."""
    ids = list(prompt)
    for _ in range(steps):
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        probs = torch.softmax(out.logits[0, -1].float(), -1)
        context = out.hidden_states[-1][0]  # (T, H)
        cands = torch.topk(probs, k).indices
        hidden = torch.stack([model(input_ids=torch.tensor([ids + [int(v)]]), output_hidden_states=True)
                              .hidden_states[-1][0, -1] for v in cands])
        ids.append(int(cands[choose(probs, cands, hidden, context, alpha)]))
    return ids[len(prompt):]


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_contrastive_matches_the_definition(arch_name):
    model = tiny_loaded(arch_name, scale=4.0)
    with torch.inference_mode():
        expected = _reference_contrastive(model.model, PROMPT, 12, 0.6, 4)
    got = Decoder(model, method="contrastive", alpha=0.6, top_k=4).generate(PROMPT, max_new_tokens=12)
    assert got.token_ids == expected
    assert got.stats.target_forward_passes == 12  # one pass per token


def test_contrastive_with_zero_alpha_is_greedy():
    model = tiny_loaded("llama", scale=4.0)
    greedy = Decoder(model, method="ar").generate(PROMPT, max_new_tokens=20)
    assert Decoder(model, method="contrastive", alpha=0).generate(PROMPT, max_new_tokens=20).token_ids == \
        greedy.token_ids
