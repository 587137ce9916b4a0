"""`drafters/aded.py` on its own (no model): the tri-gram matrix, the drafted tree's shape and budget, and
the sibling conditionals it hands to the verifier. Its exactness with a model is in test_tree_methods.py
(greedy equals ar, sampling follows the target) with the other tree methods."""
from __future__ import annotations

import pytest
import torch

from leapdecode import SamplingParams
from leapdecode.drafters.aded import AdedDrafter, TrigramMatrix
from leapdecode.drafters.base import DraftContext, DraftFeedback

V = 32
GREEDY, SAMPLING = SamplingParams(), SamplingParams(temperature=1.0)


def context(tokens, params=GREEDY, max_tokens=64, seed=0):
    gen = torch.Generator().manual_seed(seed) if not params.greedy else None
    return DraftContext(tokens=list(tokens), prompt_length=len(tokens), max_tokens=max_tokens, params=params,
                        generator=gen)


def paths(tree) -> list[list[int]]:
    return [tree.path_tokens(list(p)) for p in tree.layout.paths]


def test_trigram_counts_and_bigram_back_off():
    m = TrigramMatrix()
    m.observe([1, 2, 3, 1, 2, 4, 2, 5])
    assert m.successors(1, 2) == {3: 1, 4: 1}
    assert m.successors(9, 2) == {3: 1, 4: 1, 5: 1}  # unseen (9, 2): the bigram row of 2
    assert m.successors(None, 5) is None  # nothing seen after 5
    m.observe([1, 2, 3], start=2)  # only the last token is new
    assert m.successors(1, 2) == {3: 2, 4: 1}


def test_greedy_drafts_the_continuations_seen_in_the_prompt():
    d = AdedDrafter(V, max_nodes=8, max_depth=3, max_children=2, exploration=0.0)
    prompt = [7, 1, 2, 3, 4, 9, 1, 2, 3, 4, 8, 1, 2]
    d.begin(prompt, GREEDY)
    tree = d.propose(context(prompt))
    assert tree.draft_probs is None  # greedy: no probabilities
    # (1, 2) was always followed by 3, then 4; (3, 4) by 9 and 8 (once each): two leaves
    assert sorted(paths(tree)) == [[3, 4, 8], [3, 4, 9]]


@pytest.mark.parametrize("params", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
def test_tree_respects_its_budget_depth_and_width(params):
    prompt = [i % 7 for i in range(60)] + [3, 5, 3, 6, 3, 5]
    d = AdedDrafter(V, max_nodes=10, max_depth=3, max_children=2, adaptive=False)
    d.begin(prompt, params)
    for max_tokens in (10, 4):
        tree = d.propose(context(prompt, params, max_tokens=max_tokens))
        assert 0 < tree.size <= max_tokens
        assert max(len(p) for p in tree.layout.paths) <= 3
        assert all(len(c) <= 2 for c in tree.layout.children)


def test_sampling_gives_the_verifier_sibling_conditionals():
    """Under sampling each node carries the law it was drawn from given its earlier siblings: a distribution
    on the vocabulary that gives the drafted token positive probability and none to earlier siblings."""
    prompt = [1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2]
    d = AdedDrafter(V, max_nodes=6, max_depth=2, max_children=3)
    d.begin(prompt, SAMPLING)
    tree = d.propose(context(prompt, SAMPLING, seed=3))
    probs, tokens = tree.draft_probs[0], tree.tokens[0].tolist()
    assert probs.shape == (tree.size, V)
    assert torch.allclose(probs.sum(-1), torch.ones(tree.size))
    for children in tree.layout.children:
        for rank, c in enumerate(children):
            assert probs[c, tokens[c]] > 0
            assert all(probs[c, tokens[s]] == 0 for s in children[:rank])
    assert sorted(tokens[c] for c in tree.layout.children[0]) == [3, 4, 5]  # every successor of (1, 2)


def test_committed_tokens_teach_the_matrix():
    d = AdedDrafter(V, max_nodes=4, max_depth=2, exploration=0.0, adaptive=False)
    d.begin([1, 2], GREEDY)
    assert d.propose(context([1, 2, 10])) is None  # nothing ever followed 10
    d.update(DraftFeedback(proposed=0, accepted=0, committed=[10, 11, 12]))
    tree = d.propose(context([1, 2, 10, 11, 12, 10]))
    assert paths(tree)[0] == [11, 12]
