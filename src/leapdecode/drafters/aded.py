"""`aded`: Adaptive Draft-Verification (ADED; "Adaptive Draft-Verification for Efficient Large Language
Model Decoding", 2024). Model-free, lossless through verification.

- A tri-gram matrix approximates the model's next-token distribution: counts of x after (a, b), built
  from the prompt and updated with every verified (committed) token, so it adapts to the text being
  written; a bigram row backs it off when the tri-gram row is empty.
- Drafts form a tree built by a bandit-style search that balances exploitation and exploration: a
  successor's score is its estimated probability plus an exploration bonus
  c * sqrt(ln(1 + n(context)) / (1 + n(context, x))), where n counts how often a context/successor was
  drafted before (UCB). The children of a node are drawn from softmax(log score / tau) without replacement
  (Gumbel-top-k) under sampling, and are its top scores under greedy; the sibling conditionals go to
  `DraftTree.draft_probs`, so the recursive-rejection verifier stays exact.
- Adaptive: the node budget grows after fully accepted paths and shrinks after misses; the exploration
  weight decays as acceptance rises.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict

from ..sampling import SamplingParams
from ..tree import DraftTree
from .base import DraftContext, DraftFeedback, Drafter
from .trie import TreeBudget, TreeBuilder, draw_children


class TrigramMatrix:
    """Sparse tri-gram (and bigram back-off) counts."""

    def __init__(self) -> None:
        self.tri: dict[tuple[int, int], Counter] = defaultdict(Counter)
        self.bi: dict[int, Counter] = defaultdict(Counter)

    def observe(self, tokens: list[int], start: int = 0) -> None:
        """Count every token of `tokens` from index `start` on (with its one or two predecessors)."""
        for i in range(max(1, start), len(tokens)):
            self.bi[tokens[i - 1]][tokens[i]] += 1
            if i >= 2:
                self.tri[(tokens[i - 2], tokens[i - 1])][tokens[i]] += 1

    def successors(self, a: int | None, b: int) -> Counter | None:
        row = self.tri.get((a, b)) if a is not None else None
        return row if row else self.bi.get(b) or None


class AdedDrafter(Drafter):
    def __init__(self, vocab_size: int, max_nodes: int = 16, max_depth: int = 8, max_children: int = 3,
                 exploration: float = 0.5, temperature: float = 1.0, adaptive: bool = True):
        if max_nodes < 1 or max_depth < 1 or max_children < 1:
            raise ValueError("max_nodes, max_depth and max_children must be >= 1")
        if exploration < 0 or temperature <= 0:
            raise ValueError("exploration must be >= 0 and temperature > 0")
        self.vocab_size = vocab_size
        self.max_depth, self.max_children = max_depth, max_children
        self.exploration0, self.temperature = exploration, temperature
        self.budget = TreeBudget(max_nodes, low=2, high=max(2 * max_nodes, 8), enabled=adaptive)
        self.adaptive = adaptive

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.matrix = TrigramMatrix()
        self.matrix.observe(prompt)
        self.drafted: dict[tuple[int, ...], Counter] = defaultdict(Counter)  # UCB visit counts
        self.history = list(prompt[-2:])
        self.budget.reset()
        self.exploration = self.exploration0

    def _scores(self, context: list[int]) -> tuple[tuple[int, ...], dict[int, float]] | None:
        a = context[-2] if len(context) >= 2 else None
        row = self.matrix.successors(a, context[-1])
        if not row:
            return None
        key = tuple(context[-2:])
        total, visits = sum(row.values()), self.drafted[key]
        n_ctx = sum(visits.values())
        scores = {x: c / total + self.exploration * math.sqrt(math.log1p(n_ctx) / (1 + visits[x]))
                  for x, c in row.items()}
        return key, scores

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        budget = min(self.budget.value, ctx.max_tokens)
        if budget <= 0:
            return None
        builder = TreeBuilder()
        paths: dict[int, list[int]] = {-1: []}
        frontier = [(-1.0, 0, -1)]  # best-first on the product of estimated probabilities
        tie = 1
        while frontier and len(builder) < budget:
            neg, _, node = heapq.heappop(frontier)
            if len(paths[node]) >= self.max_depth:
                continue
            found = self._scores(ctx.tokens[-2:] + paths[node])
            if found is None:
                continue
            key, scores = found
            # children law: softmax(log score / tau) over the successors
            logs = [math.log(v) / self.temperature for v in scores.values()]
            top = max(logs)
            weights = [math.exp(v - top) for v in logs]
            total = sum(weights)
            law = dict(zip(scores, (w / total for w in weights)))
            k = min(self.max_children, len(scores), budget - len(builder))
            drawn = draw_children(list(law), list(law.values()), k, not ctx.params.greedy, ctx.generator,
                                  self.vocab_size)
            for rank, token in enumerate(drawn.tokens):
                self.drafted[key][token] += 1
                q = drawn.conditionals[rank] if drawn.conditionals is not None else None
                child = builder.add(node, token, q)
                paths[child] = paths[node] + [token]
                heapq.heappush(frontier, (neg * law[token], tie, child))
                tie += 1
        return builder.build()

    def update(self, feedback: DraftFeedback) -> None:
        context = self.history + list(feedback.committed)
        self.matrix.observe(context, start=len(self.history))
        self.history = context[-2:]
        if feedback.proposed:
            self.budget.update(feedback.tree, feedback.accepted_nodes)
            if self.adaptive:  # explore less while drafts are being accepted, more while they miss
                hit = feedback.accepted > 0
                self.exploration = min(2 * self.exploration0, max(0.05, self.exploration * (0.9 if hit else 1.1)))
