"""Exact sampling verification of a branching draft tree in one pass (lossless under sampling).

Multi-draft speculative sampling by recursive rejection (SpecInfer, Miao et al. 2024; SpecTr, Sun et al.
2023; Recursive Speculative Decoding, Jeon et al. 2024). Walk down from the root; at the current node with
target distribution p (after temperature/top-k/top-p) try its children in order:

    child c with token x, drawn from q_c:   accept with probability min(1, p(x) / q_c(x))
                                            on rejection  p <- norm(max(0, p - q_c))  and try the next child
    an accepted child becomes the current node (p = the target's distribution after it);
    when every child is rejected (or there are none), draw the committed token from the current p.

The rule: `DraftTree.draft_probs[b, c]` is the law of child c's token *given its earlier siblings* (the
children of the same parent that come before it). Then the rule is exact:
- children drawn independently from one q (with replacement): q_c = q for every child;
- children drawn without replacement (top-k by Gumbel-top-k, de-duplicated draws): q_c = q with the
  earlier siblings' tokens removed, renormalized (`without_replacement` builds these);
- deterministic drafters (no draft_probs): q_c is a point mass on the drafted token.
Proof (by induction from the last child): given the earlier siblings, the next residual
p' = norm(max(0, p - q_c)) does not depend on x_c, so P(out = y) = min(p(y), q_c(y)) + (1 - sum min(p, q_c)) p'(y)
= p(y); the committed token after the children of a node is therefore distributed as that node's p, and an
accepted child continues with the target's exact conditional distribution. Shown statistically in
tests/test_trees.py (with a wrong tree sampler shown to fail).
"""
from __future__ import annotations

import torch

from ..sampling import SamplingParams, probs_from_logits, sample
from ..tree import DraftTree
from .base import Verdict
from .distributions import accepts, draft_q, residual


def without_replacement(q: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Sibling conditionals for tokens drawn from `q` (V,) without replacement, in order: (len(tokens), V),
    row j = q with tokens[:j] removed, renormalized."""
    rows = []
    left = q.clone().float()
    for t in tokens:
        total = left.sum()
        rows.append(left / total if total > 0 else left.clone())
        left[t] = 0.0
    return torch.stack(rows) if rows else q.new_zeros(0, q.shape[-1])


def verify_tree_sampling(
    tree: DraftTree, target_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> Verdict:
    """target_logits: (B, N+1, V), row 0 after the root, row i+1 after node i."""
    p_all = probs_from_logits(target_logits, params)  # (B, N+1, V)
    children = tree.layout.children
    accepted_all, tokens_all = [], []
    for b in range(p_all.shape[0]):
        drafted = tree.tokens[b].tolist()
        nodes: list[int] = []
        at = 0  # row of the current node: 0 = root, i+1 = node i
        while True:
            p = p_all[b, at]
            chosen = None
            for c in children[at]:
                q = draft_q(tree, b, c, p)
                if accepts(p, q, drafted[c], generator):
                    chosen = c
                    break
                p = residual(p, q)
            if chosen is None:
                break
            nodes.append(chosen)
            at = chosen + 1
        accepted_all.append(nodes)
        tokens_all.append([drafted[n] for n in nodes] + [int(sample(p, generator))])
    return Verdict(accepted_nodes=accepted_all, tokens=tokens_all)
