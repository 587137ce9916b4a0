"""Deliberately wrong verifiers: the statistical tests must reject them (tests/verifiers/test_tree_sampling.py,
tests/test_tree_methods.py)."""
from __future__ import annotations

import torch

from leapdecode.sampling import probs_from_logits, sample
from leapdecode.verifiers import Verdict


def wrong_tree_verify(tree, logits, params, generator):
    """Recursive rejection with bugs: after a rejected child the next sibling is tried against the unchanged
    target distribution p, and after the last rejection the token is drawn from p, not from the residual."""
    p_all = probs_from_logits(logits, params)
    drafted = tree.tokens[0].tolist()
    nodes, at = [], 0
    while True:
        p = p_all[0, at]
        chosen = None
        for c in tree.layout.children[at]:
            q = tree.draft_probs[0, c] if tree.draft_probs is not None else torch.nn.functional.one_hot(
                torch.tensor(drafted[c]), p.shape[-1]).float()
            x = drafted[c]
            if float(torch.rand((), generator=generator)) * float(q[x]) < float(p[x]):
                chosen = c
                break
        if chosen is None:
            break
        nodes.append(chosen)
        at = chosen + 1
    p = p_all[0, at]  # and after rejecting every child it samples from p itself, not from the residual
    return Verdict(accepted_nodes=[nodes], tokens=[[drafted[n] for n in nodes] + [int(sample(p, generator))]])
