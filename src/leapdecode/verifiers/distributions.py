"""The distributions the sampling verifiers compare, built in one place.

- `draft_q`: the draft distribution q a drafted token was drawn from, on the target's vocabulary. A drafter
  without probabilities proposes a point mass (q(x) = 1). A draft model's output layer may have a different
  number of padding rows than the target's (the same tokenizer, heads padded to another multiple): q is
  padded with zeros, or its extra rows are cut (`fit_vocab`); rows past the target's vocabulary are never
  tokens the target can emit.
- `residual`: norm(max(0, p - q)), what the target samples from after rejecting a token drawn from q.

Cutting q's extra rows keeps the verifiers exact: a token x drawn from q is accepted with probability
min(1, p(x)/q(x)), with p(x) = 0 past the target's rows, so P(accept y) = min(p(y), q(y)) on the target's
rows, and the rejection mass 1 - sum_y min(p(y), q(y)) equals the mass of max(0, p - q) there.
"""
from __future__ import annotations

import torch

from ..tree import DraftTree


def fit_vocab(q: torch.Tensor, size: int) -> torch.Tensor:
    """q (..., V') on a vocabulary of `size` entries: zero-padded when V' < size, cut when V' > size."""
    width = q.shape[-1]
    if width < size:
        return torch.nn.functional.pad(q, (0, size - width))
    return q[..., :size] if width > size else q


def draft_q(tree: DraftTree, b: int, node: int, like: torch.Tensor) -> torch.Tensor:
    """The distribution node `node` of sequence `b` was drawn from (given its earlier siblings, see
    `tree_sampling`), on the vocabulary, device and dtype of the target distribution `like` (V,)."""
    if tree.draft_probs is None:
        q = torch.zeros_like(like)
        token = int(tree.tokens[b, node])
        if token < q.shape[-1]:
            q[token] = 1.0
        return q
    return fit_vocab(tree.draft_probs[b, node].to(like), like.shape[-1])


def accepts(p: torch.Tensor, q: torch.Tensor, token: int, generator: torch.Generator | None,
            gamma: float = 1.0) -> bool:
    """Accept `token` drawn from q with probability min(1, p(token) / (gamma q(token))) (one uniform draw
    from `generator`; gamma > 1 for SpecTr's k-sequential rule); a token outside p's vocabulary is rejected."""
    px = float(p[token]) if token < p.shape[-1] else 0.0
    qx = float(q[token]) if token < q.shape[-1] else 0.0
    u = float(torch.rand((), generator=generator))
    return qx > 0 and u * gamma * qx < px  # u < p / (gamma q) without dividing


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)); falls back to p when the residual has no mass (p == q)."""
    r = (p - q).clamp_min(0.0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(1e-30), p)
