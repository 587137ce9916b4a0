"""`verifiers/relaxed.py` and the `BASE+RULE` methods: at zero relaxation each rule is exact verification
(the same tokens, greedy and sampled with one seed, chains and trees, three architectures); relaxed, each
rule keeps drafted tokens exact verification rejects; the methods are lossy and check their knobs."""
from __future__ import annotations

import math
import random

import pytest
import torch

from leapdecode import Decoder, SamplingParams
from leapdecode.errors import InvalidSettingError
from leapdecode.methods import get_method
from leapdecode.step import verify_rows
from leapdecode.tree import DraftTree
from leapdecode.verifiers import verify
from leapdecode.verifiers.relaxed import GroupedRule, LanternRule, TypicalRule, make_rule
from conftest import tiny_loaded

ZERO = {  # each rule's knobs at zero relaxation
    "typical": {"epsilon": 1.0, "delta": math.inf},
    "lantern": {"delta": 0.0, "k": 8},
    "grouped": {"tau": 0.0, "max_group": 8},
}
LOOSE = {  # far relaxed: every drafted token of nonzero target probability is admitted (greedy)
    "typical": {"epsilon": 0.0, "delta": 0.0},
    "grouped": {"tau": 1.0, "max_group": 64},
}


def prompts(seed: int, n: int = 4, vocab: int = 64) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        base = [rng.randrange(1, vocab) for _ in range(rng.randint(2, 5))]
        out.append((base * 8)[: rng.randint(8, 24)] if i % 2 else [rng.randrange(1, vocab) for _ in range(12)])
    return out


# ----- the rules on synthetic distributions ------------------------------------------------------------

def _tree_case(seed: int, vocab: int = 16):
    """A branching tree with draft probabilities (children drawn without replacement) and target logits."""
    gen = torch.Generator().manual_seed(seed)
    parents = (-1, -1, 0, 0, 1, 2, 5)
    tokens = torch.randint(0, vocab, (1, len(parents)), generator=gen)
    for i, p in enumerate(parents):  # siblings distinct
        sibs = [j for j in range(i) if parents[j] == p]
        while int(tokens[0, i]) in [int(tokens[0, j]) for j in sibs]:
            tokens[0, i] = (tokens[0, i] + 1) % vocab
    probs = torch.rand(1, len(parents), vocab, generator=gen).softmax(-1)
    logits = 2 * torch.randn(1, len(parents) + 1, vocab, generator=gen)
    return tokens, parents, probs, logits


@pytest.mark.parametrize("rule", list(ZERO))
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.7, top_k=5, top_p=0.9)])
def test_zero_relaxation_is_exact_verification_on_random_trees(rule, params):
    table = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    acceptance = make_rule(rule, ZERO[rule]) if rule != "lantern" else LanternRule(table, **ZERO[rule])
    for seed in range(40):
        tokens, parents, probs, logits = _tree_case(seed)
        for tree in (DraftTree(tokens=tokens, parents=parents, draft_probs=probs),
                     DraftTree(tokens=tokens, parents=parents),  # point masses
                     DraftTree.chain(tokens[0, :4], probs[0, :4])):
            exact = verify(tree, logits[:, : tree.size + 1], params, torch.Generator().manual_seed(seed))
            relaxed = verify(tree, logits[:, : tree.size + 1], params, torch.Generator().manual_seed(seed),
                             acceptance)
            assert relaxed == exact


def test_typical_threshold_follows_the_entropy():
    rule = TypicalRule(epsilon=0.3, delta=0.5)
    peaked = torch.tensor([0.97, 0.01, 0.01, 0.01])
    flat = torch.full((4,), 0.25)
    assert rule.threshold(flat) == pytest.approx(min(0.3, 0.5 * math.exp(-math.log(4))))
    assert rule.admits_greedy(flat, 1)  # 0.25 > 0.125
    assert not rule.admits_greedy(peaked, 1)
    assert TypicalRule(epsilon=0.09).delta == pytest.approx(0.3)  # delta defaults to sqrt(epsilon)


def test_lantern_neighbourhood_stays_within_the_budget():
    table = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.9, 0.4], [0.0, 1.0]])
    p = torch.tensor([0.5, 0.2, 0.25, 0.05])
    assert LanternRule(table, k=2, delta=0.6).neighbours(1).tolist() == [0, 2]
    assert sorted(LanternRule(table, k=2, delta=0.6).neighbourhood(p, 1).tolist()) == [0, 1]  # 0.5 + 0.25 > 0.6
    assert LanternRule(table, k=2, delta=0.4).neighbourhood(p, 1).tolist() == [1]
    assert LanternRule(table, k=2, delta=0.6).admits_greedy(p, 1)  # 0.2 + 0.5 > 0.5
    assert not LanternRule(table, k=2, delta=0.4).admits_greedy(p, 1)
    assert not LanternRule(table, k=2, delta=0.6).admits_greedy(p, 3)  # A(3) = {3, 2, 1}: 0.5, not above the argmax's
    # sampling: both sides summed over A(x) = {1, 0}
    q = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert LanternRule(table, k=2, delta=0.6).admits_sampled(p, q, 1, u=0.65)  # 0.65 < 0.7
    assert not LanternRule(table, k=2, delta=0.4).admits_sampled(p, q, 1, u=0.65)


def test_grouped_forms_the_smallest_group_reaching_tau():
    p = torch.tensor([0.1, 0.4, 0.3, 0.2])
    assert GroupedRule(tau=0.6).group(p).tolist() == [1, 2]
    assert GroupedRule(tau=0.0).group(p).tolist() == [1]
    assert GroupedRule(tau=1.0, max_group=3).group(p).tolist() == [1, 2, 3]
    assert GroupedRule(tau=0.6).admits_greedy(p, 2) and not GroupedRule(tau=0.6).admits_greedy(p, 3)
    q = torch.tensor([0.0, 0.0, 1.0, 0.0])
    assert GroupedRule(tau=0.6).admits_sampled(p, q, 2, u=0.69)  # p(G) = 0.7 over q(G) = 1


def test_batched_greedy_rows_keep_their_own_rule():
    logits = torch.full((2, 3, 8), -5.0)
    logits[:, :, 1] = 2.0  # argmax 1 everywhere
    logits[:, :, 2] = 1.9  # a close second
    trees = [DraftTree.chain(torch.tensor([2, 2])), DraftTree.chain(torch.tensor([2, 2]))]
    params = [SamplingParams(), SamplingParams()]
    verdict = verify_rows(trees, logits, params, [None, None], rules=[GroupedRule(tau=0.9), None])
    assert verdict.tokens == [[2, 2, 1], [1]]


# ----- the methods -------------------------------------------------------------------------------------

def _zero(rule: str) -> dict:
    return {"embeddings": "output", **ZERO[rule]} if rule == "lantern" else dict(ZERO[rule])


@pytest.mark.parametrize("rule", list(ZERO))
def test_methods_at_zero_relaxation_equal_their_exact_base(arch, rule):
    target = tiny_loaded(arch, scale=6.0)
    draft = tiny_loaded(arch, seed=1, scale=6.0, layers=1)
    cases = [("pld", None, {}), ("pld-tree", None, {}), ("draft", draft, {"num_draft_tokens": 4}),
             ("draft-tree", draft, {"max_nodes": 8})]
    for base, d, options in cases:
        exact = Decoder(target, base, draft=d, **options)
        relaxed = Decoder(target, f"{base}+{rule}", draft=d, **options, **_zero(rule))
        for i, prompt in enumerate(prompts(5)):
            for sampled in (False, True):
                kw = {"temperature": 0.8, "seed": i} if sampled else {}
                ref = exact.generate(prompt, max_new_tokens=20, **kw)
                out = relaxed.generate(prompt, max_new_tokens=20, **kw)
                assert out.token_ids == ref.token_ids, (base, rule, sampled)


def test_spectr_at_zero_relaxation_equals_spectr():
    target = tiny_loaded("llama", scale=3.0)
    draft = tiny_loaded("llama", seed=1, scale=3.0, layers=1)
    options = {"num_drafts": 3, "num_draft_tokens": 3}
    exact = Decoder(target, "spectr", draft=draft, **options)
    for rule in ZERO:
        relaxed = Decoder(target, f"spectr+{rule}", draft=draft, **options, **_zero(rule))
        for i, prompt in enumerate(prompts(6)):
            ref = exact.generate(prompt, max_new_tokens=16, temperature=1.0, seed=i)
            assert relaxed.generate(prompt, max_new_tokens=16, temperature=1.0, seed=i).token_ids == ref.token_ids


@pytest.mark.parametrize("rule", list(LOOSE))
def test_loose_rules_accept_every_draft(rule):
    target = tiny_loaded("llama", scale=2.0)
    draft = tiny_loaded("llama", seed=1, scale=2.0, layers=1)
    dec = Decoder(target, f"draft+{rule}", draft=draft, num_draft_tokens=4, **LOOSE[rule])
    exact = Decoder(target, "draft", draft=draft, num_draft_tokens=4)
    out = dec.generate(prompts(7)[0], max_new_tokens=24)
    assert out.stats.acceptance_rate == 1.0
    assert exact.generate(prompts(7)[0], max_new_tokens=24).stats.acceptance_rate < 1.0


def test_relaxed_methods_are_lossy_and_check_their_knobs():
    for base in ("pld", "draft", "pld-tree", "draft-tree", "spectr", "medusa", "self-spec", "aded"):
        for rule in ZERO:
            spec = get_method(f"{base}+{rule}")
            assert spec.promise == "lossy" and spec.needs_draft_model == get_method(base).needs_draft_model
    with pytest.raises(InvalidSettingError):
        get_method("ar+typical")
    target = tiny_loaded("llama")
    with pytest.raises(InvalidSettingError):
        Decoder(target, "pld+typical", tau=0.5)  # grouped's knob
    with pytest.raises(InvalidSettingError):
        Decoder(target, "pld+grouped", tau=2.0)
    with pytest.raises(InvalidSettingError):
        Decoder(target, "pld+lantern", embeddings="hidden")
    assert Decoder(target, "pld+typical", epsilon=0.2).drafter.acceptance.epsilon == 0.2


def test_relaxed_rows_in_the_batch_engine_equal_decoding_alone():
    """A relaxed row shares a batch with exact rows: each gives what it gives decoded alone (greedy and seeded)."""
    from leapdecode.batching import BatchEngine
    from leapdecode.engine import _settings

    target = tiny_loaded("qwen2", scale=4.0)
    methods = {"pld": {}, "pld+grouped": {"tau": 0.9}, "pld-tree+typical": {"epsilon": 0.2}, "ar": {}}
    # drafts as they would be alone (no width policy, no batch cap): a relaxed output depends on the drafts
    engine = BatchEngine(target, methods, max_batch_size=4, step_draft_budget=64, fit_width=False)
    jobs = []
    for i, prompt in enumerate(prompts(8, n=6)):
        method = list(methods)[i % 4]
        kw = {"max_new_tokens": 16, **({"temperature": 0.8, "seed": i} if i >= 4 else {})}
        jobs.append((prompt, method, kw, engine.submit(prompt, method, _settings(**kw))))
    engine.run_until_done()
    for prompt, method, kw, handle in jobs:
        alone = Decoder(target, method, fit_width=False, **methods[method]).generate(prompt, **kw)
        assert handle.result.token_ids == alone.token_ids, method
