"""Token trees: layout compilation, one-pass tree scoring equals sequential decoding, KV compaction, cuts.
The tree verifiers are tested in tests/verifiers/, the tree drafters' helpers in tests/drafters/."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from leapdecode import DraftTree
from leapdecode.lm import CausalLM
from leapdecode.tree import compile_layout
from leapdecode.verifiers.kseq import MultiDraftTree
from conftest import tiny_loaded

# logits of a node scored inside a tree vs. the same path decoded token by token (float32, SDPA)
ATOL, RTOL = 1e-4, 1e-4


# ----- layout ---------------------------------------------------------------------------------------
def test_compile_hand_drawn_tree():
    #        root
    #       /    \
    #      0      1
    #     / \     |
    #    2   3    4
    #    |
    #    5
    layout = compile_layout((-1, -1, 0, 0, 1, 2))
    assert layout.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert layout.children == ((0, 1), (2, 3), (4,), (5,), (), (), ())
    assert layout.paths == ((0, 3), (1, 4), (0, 2, 5))  # in leaf order
    assert not layout.is_chain
    expected = torch.zeros(7, 7, dtype=torch.bool)
    rows = {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 4], 5: [0, 2, 5], 6: [0, 1, 3, 6]}
    for q, ks in rows.items():
        expected[q, ks] = True
    assert torch.equal(layout.ancestor_mask, expected)
    with pytest.raises(ValueError):
        compile_layout((-1, 2, 0))


def test_chain_and_medusa_paths():
    chain = DraftTree.chain(torch.tensor([5, 6, 7]))
    assert chain.layout.is_chain and chain.layout.paths == ((0, 1, 2),)
    assert chain.layout.depths.tolist() == [0, 1, 2, 3]
    tree = DraftTree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], torch.tensor([10, 11, 12, 13, 14, 15]))
    assert tree.parents == (-1, -1, 0, 0, 1, 2)
    assert tree.tokens[0].tolist() == [10, 11, 12, 13, 14, 15]
    assert tree.path_tokens([0, 2, 5]) == [10, 12, 15]


def random_tree(rng: random.Random, n: int, vocab: int) -> DraftTree:
    parents = [-1] + [rng.randrange(-1, i) for i in range(1, n)]
    return DraftTree(tokens=torch.tensor([[rng.randrange(vocab) for _ in range(n)]]), parents=tuple(parents))


def path_of(tree: DraftTree, node: int) -> list[int]:
    path = []
    while node != -1:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


# ----- scoring and compaction -----------------------------------------------------------------------
@pytest.mark.parametrize("prefix_len", [3, 11])
@pytest.mark.parametrize("lead", [0, 3, -1], ids=["cached-prefix", "part-fed-with-tree", "all-fed-with-tree"])
def test_tree_scoring_equals_sequential_decoding(arch, prefix_len, lead):
    """Every node's logits from one tree pass equal those of decoding its path token by token (gemma3 with
    a sliding window of 6, crossed by the longer prefix); also when the last `lead` prefix tokens before the
    root are fed in the same pass (the engine's first step feeds the whole prompt so)."""
    target = tiny_loaded(arch)
    rng = random.Random(prefix_len)
    prefix = [rng.randrange(64) for _ in range(prefix_len)]
    tree = random_tree(rng, 9, 64)
    cached = len(prefix) - 1 - (min(lead, len(prefix) - 1) if lead >= 0 else len(prefix) - 1)
    with torch.inference_mode():
        lm = CausalLM(target.model)
        if cached:
            lm.forward(torch.tensor([prefix[:cached]]))
        logits = lm.score_tree(torch.tensor([prefix[cached:]]), tree)[0]  # (N+1, V)
        assert lm.length == len(prefix) + tree.size
        for row in range(tree.size + 1):
            path = tree.path_tokens(path_of(tree, row - 1)) if row else []
            ref = target.model(input_ids=torch.tensor([prefix + path])).logits[0, -1]
            torch.testing.assert_close(logits[row], ref, atol=ATOL, rtol=RTOL)


def test_keep_path_equals_plain_cache(arch):
    target = tiny_loaded(arch)
    rng = random.Random(3)
    for trial in range(4):
        prefix = [rng.randrange(64) for _ in range(rng.randint(2, 12))]
        tree = random_tree(rng, 8, 64)
        leaf = rng.randrange(-1, tree.size)
        nodes = path_of(tree, leaf)
        with torch.inference_mode():
            lm = CausalLM(target.model)
            lm.forward(torch.tensor([prefix[:-1]]))
            start = lm.length
            lm.score_tree(torch.tensor([[prefix[-1]]]), tree)
            lm.keep_path(start, nodes)
            cache = DynamicCache()
            target.model(input_ids=torch.tensor([prefix + tree.path_tokens(nodes)]), cache=cache, use_cache=True)
        assert lm.length == len(prefix) + len(nodes)
        for mine, ref in zip(lm.cache.layers, cache.layers):
            torch.testing.assert_close(mine.keys, ref.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mine.values, ref.values, atol=1e-5, rtol=1e-4)


def test_chain_is_cut_after_its_first_end_token():
    probs = torch.rand(5, 7)
    chain = DraftTree.chain(torch.tensor([4, 2, 9, 2, 3]), probs)
    cut = chain.cut_after_stop({9, 3})
    assert cut.tokens.tolist() == [[4, 2, 9]] and torch.equal(cut.draft_probs[0], probs[:3])
    assert chain.cut_after_stop({8}) is chain and chain.cut_after_stop(set()) is chain
    tree = DraftTree(tokens=torch.tensor([[9, 1, 2]]), parents=(-1, -1, 1))
    assert tree.cut_after_stop({9}) is tree  # only chains are cut
    same = MultiDraftTree(tokens=torch.tensor([[4, 9, 2]]), parents=(-1, 0, 1), draft_probs=torch.rand(1, 3, 7),
                          drafts=((0, 1, 2), (0, 1, 2)))
    assert same.cut_after_stop({9}) is same  # k coinciding drafts keep the multi-draft rule
    assert same.prefix(1) is same  # nor does the engine's draft cut shorten them
