"""SpecTr's k-sequential draft selection (Sun et al., "SpecTr: Fast Speculative Decoding via Optimal
Transport", 2023), lossless under sampling.

The drafter draws k sequences independently from the draft model and merges them into a trie
(`MultiDraftTree`; `drafts[j]` is draft j's node path). At the current node the drafts still alive (those
whose path went through every accepted node) are tried in draft order j = 1..m; all their next tokens are
i.i.d. from the draft distribution q at this node, so K-SEQ applies:

    beta(gamma) = sum_x min(q(x), p(x) / gamma)
    try draft j's token x: accept with probability min(1, p(x) / (gamma q(x)))
    none accepted (probability (1 - beta)^m): draw from
        p_res(x) = (p(x) - min(q(x), p(x)/gamma) (1 - (1 - beta)^m) / beta) / (1 - beta)^m

P(out = x) = min(q(x), p(x)/gamma) (1 - (1-beta)^m)/beta + (1-beta)^m p_res(x) = p(x), and p_res >= 0 needs
(1 - (1-beta)^m)/beta <= gamma; gamma in [1, m] is the smallest value meeting it (bisection; gamma = m always
does). With m = 1 this is plain speculative sampling. Given the accepted token, the live drafts' next tokens
are again i.i.d. from q at the accepted node, so the walk continues exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import SamplingParams, probs_from_logits, sample
from ..tree import DraftTree
from .base import Verdict
from .distributions import accepts, draft_q


@dataclass
class MultiDraftTree(DraftTree):
    """A trie of k independently drawn drafts; `draft_probs[b, i]` is the draft distribution node i's token
    was drawn from (the draft model at node i's parent)."""

    drafts: tuple[tuple[int, ...], ...] = ()  # (k, ragged) node indices of each draft, root to leaf

    def prefix(self, n: int) -> "MultiDraftTree":
        """Never cut (not after an end token, not by the engine's draft cut): SpecTr's k-sequential rule
        needs the k whole drafts, also when they coincide and the tree is a chain in shape."""
        return self


def kseq_gamma(p: torch.Tensor, q: torch.Tensor, m: int, iterations: int = 20) -> float:
    """The smallest gamma in [1, m] with (1 - (1 - beta)^m) / beta <= gamma (bisection)."""

    def ok(gamma: float) -> bool:
        beta = float(torch.minimum(q, p / gamma).sum())
        if beta <= 0:
            return True
        return (1 - (1 - beta) ** m) / beta <= gamma * (1 + 1e-6)

    if m <= 1 or ok(1.0):
        return 1.0
    lo, hi = 1.0, float(m)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def kseq_residual(p: torch.Tensor, q: torch.Tensor, m: int, gamma: float) -> torch.Tensor:
    low = torch.minimum(q, p / gamma)
    beta = float(low.sum())
    if beta <= 0:
        return p
    r = (p - low * (1 - (1 - beta) ** m) / beta).clamp_min(0.0)
    total = r.sum()
    return r / total if total > 0 else p


def verify_kseq(
    tree: MultiDraftTree, target_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> Verdict:
    p_all = probs_from_logits(target_logits, params)  # (B, N+1, V)
    accepted_all, tokens_all = [], []
    for b in range(p_all.shape[0]):
        drafted = tree.tokens[b].tolist()
        nodes: list[int] = []
        alive = list(range(len(tree.drafts)))
        depth, at = 0, 0
        while True:
            p = p_all[b, at]
            tries = [tree.drafts[j][depth] for j in alive if len(tree.drafts[j]) > depth]
            if not tries:
                out = int(sample(p, generator))
                break
            q = draft_q(tree, b, tries[0], p)  # the drafts alive here drew their next tokens from one q
            gamma = kseq_gamma(p, q, len(tries))
            chosen = None
            for c in tries:
                if accepts(p, q, drafted[c], generator, gamma):
                    chosen = c
                    break
            if chosen is None:
                out = int(sample(kseq_residual(p, q, len(tries), gamma), generator))
                break
            nodes.append(chosen)
            alive = [j for j in alive if len(tree.drafts[j]) > depth and tree.drafts[j][depth] == chosen]
            depth, at = depth + 1, chosen + 1
        accepted_all.append(nodes)
        tokens_all.append([drafted[n] for n in nodes] + [out])
    return Verdict(accepted_nodes=accepted_all, tokens=tokens_all)
