"""Adaptive draft length and tree budget: the `update` hooks grow after a draft that was right to its end
and shrink after a miss, within their bounds."""
from __future__ import annotations

import torch

from leapdecode.drafters.base import AdaptiveLength, DraftFeedback
from leapdecode.drafters.trie import TreeBudget
from leapdecode.tree import DraftTree

CHAIN = DraftTree.chain(torch.tensor([5, 6, 7]))
TREE = DraftTree(tokens=torch.tensor([[5, 6, 7, 8]]), parents=(-1, -1, 0, 2))  # 0 -> 2 -> 3, and 1 alone


def feedback(tree: DraftTree, accepted_nodes: list[int]) -> DraftFeedback:
    return DraftFeedback(proposed=tree.size, accepted=len(accepted_nodes), accepted_nodes=accepted_nodes,
                         tree=tree)


def test_adaptive_length_on_chains():
    length = AdaptiveLength(4, low=2, high=7)
    length.update(feedback(CHAIN, [0, 1, 2]))
    assert length.value == 6
    length.update(feedback(CHAIN, [0, 1, 2]))
    assert length.value == 7  # bounded
    for _ in range(9):
        length.update(feedback(CHAIN, [0]))
    assert length.value == 2  # bounded
    length.update(DraftFeedback(proposed=0, accepted=0))
    assert length.value == 2  # nothing proposed: no change
    length.reset()
    assert length.value == 4
    off = AdaptiveLength(4, enabled=False)
    off.update(feedback(CHAIN, [0, 1, 2]))
    assert off.value == 4


def test_adaptive_length_grows_when_a_tree_path_reaches_a_leaf():
    length = AdaptiveLength(4)
    length.update(feedback(TREE, [0, 2, 3]))  # a whole branch, though not every node
    assert length.value == 6
    length.update(feedback(TREE, [1]))  # node 1 is a leaf too
    assert length.value == 8
    length.update(feedback(TREE, [0, 2]))  # stopped inside the branch
    assert length.value == 7


def test_tree_budget():
    budget = TreeBudget(6, low=3, high=9)
    budget.update(TREE, [0, 2, 3])
    assert budget.value == 8
    budget.update(TREE, [0])  # partial: unchanged
    assert budget.value == 8
    for _ in range(9):
        budget.update(TREE, [])
    assert budget.value == 3
    budget.update(None, [])
    assert budget.value == 3
