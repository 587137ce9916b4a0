"""Building draft trees node by node, and merging candidate sequences into a trie (shared by the tree
drafters). Nodes are appended parent-first, so every parent index is smaller than its children's."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tree import DraftTree


@dataclass
class TreeBuilder:
    """Accumulates nodes; `add` returns the new node's index (-1 is the root)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)  # per node, only when every node has one

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, q: torch.Tensor | None = None) -> int:
        self.tokens.append(int(token))
        self.parents.append(parent)
        if q is not None:
            self.probs.append(q)
        return len(self.tokens) - 1

    def child(self, parent: int, token: int) -> int | None:
        """The existing child of `parent` carrying `token`, if any."""
        for i in range(len(self.tokens)):
            if self.parents[i] == parent and self.tokens[i] == token:
                return i
        return None

    def build(self) -> DraftTree | None:
        if not self.tokens:
            return None
        probs = torch.stack(self.probs).unsqueeze(0) if len(self.probs) == len(self.tokens) else None
        return DraftTree(tokens=torch.tensor([self.tokens], dtype=torch.long), parents=tuple(self.parents),
                         draft_probs=probs)


def trie_from_sequences(sequences: list[list[int]], budget: int) -> DraftTree | None:
    """Merge candidate continuations (best first) into one tree of at most `budget` nodes; a deterministic
    drafter's tree (no draft_probs: each node is a point mass, siblings are distinct tokens)."""
    builder = TreeBuilder()
    for seq in sequences:
        at = -1
        for token in seq:
            nxt = builder.child(at, token)
            if nxt is None:
                if len(builder) >= budget:
                    break
                nxt = builder.add(at, token)
            at = nxt
    return builder.build()


class TreeBudget:
    """Adaptive node budget for tree drafters: grow by 2 when the accepted path reached a leaf (the tree
    was too small), shrink by 1 when nothing was accepted, bounded to [low, high]."""

    def __init__(self, start: int, low: int = 1, high: int = 64, enabled: bool = True):
        self.start, self.low, self.high, self.enabled = start, low, high, enabled
        self.value = start

    def reset(self) -> None:
        self.value = self.start

    def update(self, tree: DraftTree | None, accepted_nodes: list[int]) -> None:
        if not self.enabled or tree is None or tree.size == 0:
            return
        if tree.ends_at_leaf(accepted_nodes):
            self.value = min(self.high, self.value + 2)
        elif not accepted_nodes:
            self.value = max(self.low, self.value - 1)


@dataclass(frozen=True)
class Children:
    """The children drawn at one tree node: tokens in draw order and, under sampling, their sibling
    conditionals (k, V) for the recursive-rejection verifier (None under greedy, which does not read them)."""

    tokens: list[int]
    conditionals: torch.Tensor | None


def draw_children(support: list[int], weights: list[float], k: int, sampling: bool,
                  generator: torch.Generator | None, vocab_size: int) -> Children:
    """Pick up to `k` distinct children from a small distribution given as `support` ids and non-negative
    `weights` (normalised here), without building a vocabulary-sized vector per node.

    Greedy: the k heaviest ids (earlier ids first on ties). Sampling: k draws without replacement by
    Gumbel-top-k over the support, with row j of `conditionals` = q with the first j draws removed,
    renormalised (the law of draw j given the earlier ones; what the exact tree verifier needs)."""
    live = [(t, w) for t, w in zip(support, weights) if w > 0]
    k = min(k, len(live))
    if k <= 0:
        return Children([], None)
    if not sampling:
        order = sorted(range(len(live)), key=lambda i: -live[i][1])[:k]
        return Children([live[i][0] for i in order], None)
    ids = torch.tensor([t for t, _ in live], dtype=torch.long)
    q = torch.tensor([w for _, w in live], dtype=torch.float64)
    q = q / q.sum()
    u = torch.rand(len(live), generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
    picks = torch.topk(q.log() - (-u.log()).log(), k).indices
    rows = torch.zeros(k, len(live), dtype=torch.float64)
    left = q.clone()
    for j, p in enumerate(picks.tolist()):
        rows[j] = left / left.sum()
        left[p] = 0.0
    conditionals = torch.zeros(k, vocab_size, dtype=torch.float32)
    conditionals[:, ids] = rows.float()
    return Children(ids[picks].tolist(), conditionals)
