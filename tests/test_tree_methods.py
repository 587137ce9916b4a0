"""The tree methods (pld-tree, aded, stand, lookahead, draft-tree, spectr) are lossless: greedy ids equal
plain greedy decoding on three architectures, and sampled outputs follow the target's distribution
(chi-square against the exact distribution of the first three tokens, as in tests/test_sampling.py; a
deliberately wrong tree sampler is shown to fail the same test)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import leapdecode.step as step
from leapdecode import Decoder, SamplingParams, get_method
from leapdecode.drafters.base import Drafter
from leapdecode.errors import InvalidSettingError
from conftest import tiny_loaded
from test_exactness import random_prompts
from test_sampling import STEPS, chi_square_pvalue, exact_distribution, sampled_counts
from wrong_samplers import wrong_tree_verify

MODEL_FREE = ["pld-tree", "aded", "stand", "lookahead"]
WITH_DRAFT = ["draft-tree", "spectr"]
RUNS = 1000  # enough well-filled cells (>= 26 with p >= 5/RUNS) for the chi-square test
# context (1, 2) is followed by 3, 4 and 5 in the prompt: the n-gram drafters branch from the first step
TREE_PROMPT = [1, 2, 3, 1, 2, 4, 1, 2, 5, 6, 1, 2]


class BranchCounter(Drafter):
    """Wraps a drafter and counts proposals that branch (so the tests cover real trees)."""

    def __init__(self, inner):
        self.inner, self.branching, self.proposals = inner, 0, 0
        self.cuttable = inner.cuttable

    def begin(self, prompt, params):
        self.inner.begin(prompt, params)

    def propose(self, ctx):
        tree = self.inner.propose(ctx)
        if tree is not None and tree.size:
            self.proposals += 1
            self.branching += not tree.layout.is_chain
        return tree

    def update(self, feedback):
        self.inner.update(feedback)


@pytest.mark.parametrize("method", MODEL_FREE + WITH_DRAFT)
def test_greedy_equals_ar(arch, method):
    target = tiny_loaded(arch, scale=6.0)
    draft = tiny_loaded(arch, seed=0, scale=6.0) if method in WITH_DRAFT else None  # the target drafting itself
    ar = Decoder(target, "ar")
    dec = Decoder(target, method, draft=draft)
    dec.drafter = BranchCounter(dec.drafter)
    accepted = 0
    for prompt in random_prompts(7):
        ref = ar.generate(prompt, max_new_tokens=24)
        out = dec.generate(prompt, max_new_tokens=24)
        assert out.token_ids == ref.token_ids
        accepted += sum(out.stats.accept_lengths) - len(out.stats.accept_lengths)
    assert accepted > 0
    assert dec.drafter.branching > 0  # trees with branches were verified


def test_pld_with_branches_is_multi_candidate_pld(arch):
    """`pld` with num_branches > 1 merges several matches into a tree, like the `pld-tree` preset."""
    target = tiny_loaded(arch, scale=6.0)
    ar = Decoder(target, "ar")
    dec = Decoder(target, "pld", num_branches=3, num_draft_tokens=3)
    dec.drafter = BranchCounter(dec.drafter)
    for prompt in random_prompts(7):
        assert dec.generate(prompt, max_new_tokens=24).token_ids == ar.generate(prompt, max_new_tokens=24).token_ids
    assert dec.drafter.branching > 0


def test_weak_draft_model_still_exact(arch):
    target = tiny_loaded(arch, scale=6.0)
    draft = tiny_loaded(arch, seed=1, scale=6.0, layers=1)
    ar = Decoder(target, "ar")
    for method in WITH_DRAFT:
        dec = Decoder(target, method, draft=draft, max_nodes=6) if method == "draft-tree" else \
            Decoder(target, method, draft=draft, num_drafts=2, num_draft_tokens=2)
        for prompt in random_prompts(9, n=3):
            assert dec.generate(prompt, max_new_tokens=24).token_ids == ar.generate(prompt, max_new_tokens=24).token_ids


def test_methods_registered_lossless_with_papers():
    for name in MODEL_FREE + WITH_DRAFT:
        spec = get_method(name)
        assert spec.promise == "lossless" and spec.paper and spec.description
    assert get_method("spectr").needs_draft_model and get_method("draft-tree").needs_draft_model
    with pytest.raises(InvalidSettingError):
        Decoder(tiny_loaded("llama"), "stand", bogus=1)
    with pytest.raises(InvalidSettingError):
        Decoder(tiny_loaded("llama"), "aded", max_nodes=0)


# ----- sampling ---------------------------------------------------------------------------------------
VOCAB = 8
SAMPLING_OPTIONS = {
    "stand": {"max_nodes": 6, "max_depth": 3},
    "aded": {"max_nodes": 6, "max_depth": 3},
    "pld-tree": {"num_draft_tokens": 1, "num_branches": 3},  # 2 nodes fit the 3-token budget: 2 branches
    "lookahead": {"window": 2, "max_nodes": 6},
    "draft-tree": {"max_nodes": 6, "min_reach": 0.0},
    "spectr": {"num_drafts": 3, "num_draft_tokens": 2, "adaptive": False},
}


@pytest.fixture(scope="module")
def models():
    target = tiny_loaded("llama", vocab_size=VOCAB, seed=0, scale=3.0)
    draft = tiny_loaded("llama", vocab_size=VOCAB, seed=3, scale=3.0, layers=1)
    return target, draft


def sampled(decoder: Decoder, params: SamplingParams, runs: int = RUNS) -> Counter:
    return sampled_counts(decoder, params, prompt=TREE_PROMPT, runs=runs)


def tree_decoder(models, method: str) -> Decoder:
    target, draft = models
    dec = Decoder(target, method, draft=draft if method in WITH_DRAFT else None, **SAMPLING_OPTIONS[method])
    dec.drafter = BranchCounter(dec.drafter)
    return dec


@pytest.mark.parametrize("method,params", [
    ("stand", SamplingParams(temperature=1.0)),
    ("aded", SamplingParams(temperature=1.0)),
    ("spectr", SamplingParams(temperature=1.0)),
    ("draft-tree", SamplingParams(temperature=0.8, top_k=5, top_p=0.9)),
    ("pld-tree", SamplingParams(temperature=1.0)),  # no draft probabilities: point masses
    ("lookahead", SamplingParams(temperature=1.0)),
])
def test_sampling_matches_target_distribution(models, method, params):
    dec = tree_decoder(models, method)
    counts = sampled(dec, params)
    assert chi_square_pvalue(counts, exact_distribution(models[0], TREE_PROMPT, params), RUNS) > 1e-3
    if method != "lookahead":  # its proposals within a 3-token budget are chains (window and pool need history)
        assert dec.drafter.branching > RUNS // 4  # many of the verified proposals were real trees


def test_wrong_tree_sampler_is_caught(models, monkeypatch):
    params = SamplingParams(temperature=1.0)
    monkeypatch.setattr(step, "verify", lambda tree, logits, p, g, rule=None: wrong_tree_verify(tree, logits, p, g))
    counts = sampled(tree_decoder(models, "stand"), params, runs=RUNS)
    assert chi_square_pvalue(counts, exact_distribution(models[0], TREE_PROMPT, params), RUNS) < 1e-6
