"""Draft trees: the one record every drafter returns and every verifier reads.

A chain of K drafted tokens is a tree with one branch. Node i has a parent (-1 for the root, which is the
last committed token that is fed again with the draft) and a depth (1 for children of the root). A tree's
shape compiles once (cached) into the ancestor mask and depths used to score all nodes in one forward
pass (the tree attention of SpecInfer/Medusa), and into the list of root-to-leaf paths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch


@dataclass(frozen=True)
class TreeLayout:
    """Compiled shape of a tree of N nodes plus the root (index 0 here = the root, node i = index i+1)."""

    parents: tuple[int, ...]  # (N,) parent node index, -1 = root
    depths: torch.Tensor  # (N+1,) int64, root depth 0
    ancestor_mask: torch.Tensor  # (N+1, N+1) bool, [q, k] True when k is q or an ancestor of q
    children: tuple[tuple[int, ...], ...]  # (N+1,) child node indices of the root (entry 0) and of node i (entry i+1)
    paths: tuple[tuple[int, ...], ...]  # root-to-leaf paths as node indices
    is_chain: bool


@lru_cache(maxsize=256)
def compile_layout(parents: tuple[int, ...]) -> TreeLayout:
    """Compile a parent list (each parent index smaller than its child) into a `TreeLayout`."""
    n = len(parents)
    depths = [0] * (n + 1)
    children: list[list[int]] = [[] for _ in range(n + 1)]
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[0, 0] = True
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"node {i} has parent {p}; parents must come before their children")
        depths[i + 1] = depths[p + 1] + 1
        children[p + 1].append(i)
        mask[i + 1] = mask[p + 1]
        mask[i + 1, i + 1] = True
    paths = []
    for i in range(n):
        if not children[i + 1]:
            path, node = [], i
            while node != -1:
                path.append(node)
                node = parents[node]
            paths.append(tuple(reversed(path)))
    is_chain = all(p == i - 1 for i, p in enumerate(parents))
    return TreeLayout(
        parents=parents,
        depths=torch.tensor(depths, dtype=torch.long),
        ancestor_mask=mask,
        children=tuple(tuple(c) for c in children),
        paths=tuple(paths),
        is_chain=is_chain,
    )


@dataclass
class DraftTree:
    """Drafted tokens for a batch, arranged as one tree shape shared by the batch.

    `draft_probs[b, i]` is the distribution node i was drawn from (the drafter's distribution at its parent,
    after the same sampling settings as the target), or None for drafters without probabilities (a point
    mass on the drafted token).
    """

    tokens: torch.Tensor  # (B, N) int64
    parents: tuple[int, ...]  # (N,)
    draft_probs: torch.Tensor | None = None  # (B, N, V) float32
    label: int = 0  # the drafter's class of this draft (pld: the matched n-gram's length); the draft cut
    # keeps its accept statistics per label
    _layout: TreeLayout | None = field(default=None, repr=False, compare=False)

    def cut_after_stop(self, stop_ids) -> "DraftTree":
        """A chain of one sequence cut right after its first end token (what follows can never be
        committed); any other tree is returned as it is."""
        if not stop_ids or self.tokens.shape[0] != 1 or not self.layout.is_chain:
            return self
        hit = next((i for i, t in enumerate(self.tokens[0].tolist()) if t in stop_ids), None)
        if hit is None or hit + 1 == self.size:
            return self
        return self.prefix(hit + 1)

    def prefix(self, n: int) -> "DraftTree":
        """The first n nodes: still a tree (parents come before their children), and every kept node keeps
        its earlier siblings, so the sibling conditionals in `draft_probs` stay valid."""
        if n >= self.size:
            return self
        probs = None if self.draft_probs is None else self.draft_probs[:, :n]
        return DraftTree(tokens=self.tokens[:, :n], parents=self.parents[:n], draft_probs=probs, label=self.label)

    def ends_at_leaf(self, nodes: list[int]) -> bool:
        """Whether an accepted path (node indices, root first) ends at a node without children."""
        return bool(nodes) and not self.layout.children[nodes[-1] + 1]

    @classmethod
    def chain(cls, tokens: torch.Tensor, draft_probs: torch.Tensor | None = None, label: int = 0) -> "DraftTree":
        """A chain: tokens (B, K) or (K,)."""
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
            draft_probs = None if draft_probs is None else draft_probs.unsqueeze(0)
        return cls(tokens=tokens, parents=tuple(range(-1, tokens.shape[1] - 1)), draft_probs=draft_probs,
                   label=label)

    @classmethod
    def from_paths(cls, paths: list[list[int]], tokens: torch.Tensor) -> "DraftTree":
        """Medusa-style shape: `paths` like [[0], [0, 0], [1]] (k-th child at each depth), with
        `tokens` (B, len(paths)) giving each path's last token, in the order of `paths`."""
        index = {tuple(p): i for i, p in enumerate(paths)}
        parents = []
        for p in paths:
            if len(p) > 1 and tuple(p[:-1]) not in index:
                raise ValueError(f"path {p} has no parent path {p[:-1]} in the list")
            parents.append(index[tuple(p[:-1])] if len(p) > 1 else -1)
        order = sorted(range(len(paths)), key=lambda i: (len(paths[i]), paths[i]))
        remap = {old: new for new, old in enumerate(order)}
        new_parents = tuple(-1 if parents[i] == -1 else remap[parents[i]] for i in order)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        return cls(tokens=tokens[:, order], parents=new_parents)

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    @property
    def layout(self) -> TreeLayout:
        if self._layout is None:
            self._layout = compile_layout(self.parents)
        return self._layout

    def path_tokens(self, nodes: list[int], batch: int = 0) -> list[int]:
        return [int(t) for t in self.tokens[batch, nodes].tolist()] if nodes else []
