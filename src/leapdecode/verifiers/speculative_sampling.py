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


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)); falls back to p when the residual has no mass (p == q)."""
    r = (p - q).clamp_min(0.0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(1e-30), p)


def verify_sampling(
    tree: DraftTree, target_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> Verdict:
    if not tree.layout.is_chain:  # branching trees: recursive rejection over siblings
        from .tree_sampling import verify_tree_sampling

        return verify_tree_sampling(tree, target_logits, params, generator)
    p_all = probs_from_logits(target_logits, params)  # (B, K+1, V)
    accepted_all, tokens_all = [], []
    for b in range(p_all.shape[0]):
        drafted = tree.tokens[b].tolist()
        nodes: list[int] = []
        out: list[int] = []
        for i, x in enumerate(drafted):
            p = p_all[b, i]
            if tree.draft_probs is None:
                q = torch.zeros_like(p)
                q[x] = 1.0
            else:
                q = tree.draft_probs[b, i].to(p)
            px, qx = float(p[x]), float(q[x])
            u = float(torch.rand((), generator=generator))
            if qx > 0 and u * qx < px:  # u < p/q without dividing
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
