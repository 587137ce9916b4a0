"""Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023), lossless under sampling.

For each drafted token x drawn from q: accept with probability min(1, p(x)/q(x)); on the first rejection
draw from the residual norm(max(0, p - q)) and stop; if every token is accepted, draw a bonus token from p
after the last one. A drafter without probabilities proposes a point mass (q(x) = 1), so acceptance is
p(x) and the residual is p with x removed. The output follows the target's distribution p exactly.
"""
from __future__ import annotations

import torch

from ..sampling import SamplingParams, probs_from_logits, sample
from ..tree import DraftTree
from .base import Verdict
from .distributions import accepts, draft_q, residual


def verify_sampling(
    tree: DraftTree, target_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> Verdict:
    """A chain's drafted tokens (a branching tree goes to `verify_tree_sampling`, see `verify`)."""
    if not tree.layout.is_chain:
        raise ValueError("verify_sampling verifies a chain; a branching tree goes to verify_tree_sampling")
    p_all = probs_from_logits(target_logits, params)  # (B, K+1, V)
    accepted_all, tokens_all = [], []
    for b in range(p_all.shape[0]):
        drafted = tree.tokens[b].tolist()
        nodes: list[int] = []
        out: list[int] = []
        for i, x in enumerate(drafted):
            p = p_all[b, i]
            q = draft_q(tree, b, i, p)
            if accepts(p, q, x, generator):
                nodes.append(i)
                out.append(x)
                continue
            out.append(int(sample(residual(p, q), generator)))
            break
        else:
            out.append(int(sample(p_all[b, len(drafted)], generator)))
        accepted_all.append(nodes)
        tokens_all.append(out)
    return Verdict(accepted_nodes=accepted_all, tokens=tokens_all)
