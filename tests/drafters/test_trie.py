"""`drafters/trie.py`: building draft trees and drawing a node's children."""
from __future__ import annotations

from collections import Counter

import torch

from leapdecode.drafters.trie import draw_children
from leapdecode.verifiers.tree_sampling import without_replacement
from test_sampling import chi_square_pvalue

TRIALS = 2500


def test_draw_children_from_a_small_support():
    """The model-free tree drafters draw children from a few ids without a vocabulary-sized vector: greedy
    takes the heaviest ids; sampling draws without replacement with the conditionals the verifier needs
    (equal to `without_replacement` on the full vector), and its draws follow q."""
    V, support, weights = 12, [7, 2, 9, 4, 11, 0], [0.1, 0.4, 0.3, 0.0, 0.15, 0.05]
    greedy = draw_children(support, weights, 3, False, None, V)
    assert greedy.tokens == [2, 9, 11] and greedy.conditionals is None
    assert draw_children(support, weights, 9, False, None, V).tokens == [2, 9, 11, 7, 0]  # zero weight never drawn
    q = torch.zeros(V)
    q[torch.tensor(support)] = torch.tensor(weights)
    gen = torch.Generator().manual_seed(0)
    firsts = Counter()
    for _ in range(TRIALS):
        drawn = draw_children(support, weights, 2, True, gen, V)
        assert len(set(drawn.tokens)) == 2 and 4 not in drawn.tokens
        assert torch.allclose(drawn.conditionals, without_replacement(q, drawn.tokens), atol=1e-6)
        firsts[drawn.tokens[0]] += 1
    assert chi_square_pvalue(firsts, {t: float(q[t]) for t in (7, 2, 9, 11, 0)}, TRIALS) > 1e-3
