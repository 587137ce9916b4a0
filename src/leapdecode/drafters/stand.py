"""`stand`: STochastic Adaptive N-gram Drafting (STAND; "Accelerated Test-Time Scaling with Model-Free
Speculative Sampling", 2025). Model-free, lossless through verification, for sampling as well as greedy.

- A logit-based n-gram store: for each context (the last 1..`max_ngram` tokens) it keeps the target's own
  next-token probabilities (top `top_k` entries, a running average over every time the context was seen),
  read from `DraftFeedback.target_logits` for the root and every drafted node of each verification pass.
  The store is memory-bounded: at most `max_contexts` contexts, least recently used evicted first.
  The prompt seeds it with counts (no target probabilities exist for prompt positions).
- Drafting: at each tree node the longest stored context gives a distribution q; children are drawn by
  Gumbel-top-k from q (sampling without replacement) under sampling, the top-k of q under greedy. The
  sibling conditionals (q with earlier siblings removed) go to `DraftTree.draft_probs`, which is what the
  recursive-rejection tree verifier needs to stay exact.
- Data-driven tree shape: acceptance statistics per (depth, sibling rank) estimate the chance that each tree
  slot is accepted; the `max_nodes` slots of highest estimated reach probability form the next tree.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

import torch

from ..sampling import SamplingParams, probs_from_logits
from ..tree import DraftTree
from .base import DraftContext, DraftFeedback, Drafter
from .trie import TreeBuilder, draw_children

_STORE_TEMPERATURE = 1.0  # under greedy the store keeps the plain softmax (its ranking is what matters)


class NgramProbStore:
    """context tuple -> {token: probability}, top-k per context, LRU-bounded."""

    def __init__(self, max_ngram: int, top_k: int, max_contexts: int):
        self.max_ngram, self.top_k, self.max_contexts = max_ngram, top_k, max_contexts
        self.table: OrderedDict[tuple[int, ...], dict[int, float]] = OrderedDict()

    def add(self, context: list[int], dist: dict[int, float], weight: float = 1.0) -> None:
        for n in range(1, min(self.max_ngram, len(context)) + 1):
            key = tuple(context[-n:])
            old = self.table.pop(key, None)
            if old is None:
                merged = dict(dist)
            else:  # running average toward the newest observation
                merged = {t: (1 - weight) * old.get(t, 0.0) + weight * dist.get(t, 0.0) for t in set(old) | set(dist)}
            top = sorted(merged.items(), key=lambda kv: -kv[1])[: self.top_k]
            self.table[key] = dict(top)
            while len(self.table) > self.max_contexts:
                self.table.popitem(last=False)

    def lookup(self, context: list[int]) -> dict[int, float] | None:
        for n in range(min(self.max_ngram, len(context)), 0, -1):
            found = self.table.get(tuple(context[-n:]))
            if found:
                self.table.move_to_end(tuple(context[-n:]))
                return found
        return None


class StandDrafter(Drafter):
    def __init__(self, vocab_size: int, max_nodes: int = 24, max_depth: int = 8, max_children: int = 4,
                 max_ngram: int = 3, top_k: int = 8, max_contexts: int = 200_000, adaptive: bool = True):
        if max_nodes < 1 or max_depth < 1 or max_children < 1 or top_k < 1 or max_ngram < 1:
            raise ValueError("max_nodes, max_depth, max_children, top_k and max_ngram must be >= 1")
        self.vocab_size = vocab_size
        self.max_nodes, self.max_depth, self.max_children = max_nodes, max_depth, max_children
        self.max_ngram, self.top_k, self.max_contexts, self.adaptive = max_ngram, top_k, max_contexts, adaptive

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.params = params
        self.store_params = params if not params.greedy else SamplingParams(temperature=_STORE_TEMPERATURE)
        self.store = NgramProbStore(self.max_ngram, self.top_k, self.max_contexts)
        for i in range(1, len(prompt)):
            self.store.add(prompt[:i][-self.max_ngram:], {prompt[i]: 1.0}, weight=0.5)
        # acceptance statistics per (depth, rank): accepted / tried, with a prior favouring rank 0
        self.tried = [[2.0] * self.max_children for _ in range(self.max_depth)]
        self.hits = [[1.0 / (r + 1) for r in range(self.max_children)] for _ in range(self.max_depth)]
        self.history: list[int] = list(prompt[-self.max_ngram:])  # the committed text's tail

    def _rate(self, depth: int, rank: int) -> float:
        return self.hits[depth][rank] / self.tried[depth][rank]

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        budget = min(self.max_nodes, ctx.max_tokens)
        if budget <= 0:
            return None
        builder = TreeBuilder()
        paths: dict[int, list[int]] = {-1: []}
        # best-first over slots by estimated reach probability; each expansion draws all children at once
        frontier = [(-1.0, 0, -1)]  # (-reach, tie, node)
        tie = 1
        while frontier and len(builder) < budget:
            neg_reach, _, node = heapq.heappop(frontier)
            depth = len(paths[node])
            if depth >= self.max_depth:
                continue
            dist = self.store.lookup(ctx.tokens[-self.max_ngram:] + paths[node])
            if not dist:
                continue
            # how many children: slots whose reach probability stays worth a node (decided before drawing)
            k, most = 0, min(self.max_children, sum(1 for v in dist.values() if v > 0), budget - len(builder))
            while (k < most
                   and (k == 0 or -neg_reach * self._rate(depth, k) > 0.02)):
                k += 1
            drawn = draw_children(list(dist), list(dist.values()), k, not ctx.params.greedy, ctx.generator,
                                  self.vocab_size)
            for rank, token in enumerate(drawn.tokens):
                q = drawn.conditionals[rank] if drawn.conditionals is not None else None
                child = builder.add(node, token, q)
                paths[child] = paths[node] + [token]
                heapq.heappush(frontier, (neg_reach * self._rate(depth, rank), tie, child))
                tie += 1
        self.ranks = self._ranks(builder)
        return builder.build()

    @staticmethod
    def _ranks(builder: TreeBuilder) -> list[int]:
        seen: dict[int, int] = {}
        ranks = []
        for p in builder.parents:
            ranks.append(seen.get(p, 0))
            seen[p] = ranks[-1] + 1
        return ranks

    def update(self, feedback: DraftFeedback) -> None:
        tree, logits = feedback.tree, feedback.target_logits
        committed_before = self.history[-self.max_ngram:]
        if tree is not None and logits is not None:
            top_ids, top_probs = self._top_probs(logits[0])
            parents, tokens = tree.layout.parents, tree.tokens[0].tolist()
            for row in range(tree.size + 1):
                path, node = [], row - 1
                while node != -1:
                    path.append(tokens[node])
                    node = parents[node]
                dist = {t: v for t, v in zip(top_ids[row], top_probs[row]) if v > 0}
                self.store.add((committed_before + path[::-1])[-self.max_ngram:], dist, weight=0.5)
            if self.adaptive and tree.size:
                self._learn_shape(tree, feedback.accepted_nodes)
        # the committed tokens themselves as count evidence
        ctx = list(committed_before)
        for t in feedback.committed:
            self.store.add(ctx[-self.max_ngram:], {t: 1.0}, weight=0.3)
            ctx.append(t)
        self.history = ctx[-self.max_ngram:]

    def _top_probs(self, logits: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
        """The `top_k` most probable next tokens of each row of `logits` (R, V) and their probabilities
        under the store's sampling settings, as lists. Without top-k/top-p truncation the probabilities
        come from the top logits and one log-sum-exp (no vocabulary-sized softmax)."""
        k = min(self.top_k, logits.shape[-1])
        params = self.store_params
        if params.top_k == 0 and params.top_p >= 1.0:
            scaled = logits.float() / params.temperature
            top = torch.topk(scaled, k, dim=-1)
            probs = (top.values - torch.logsumexp(scaled, dim=-1, keepdim=True)).exp()
            return top.indices.tolist(), probs.tolist()
        top = torch.topk(probs_from_logits(logits, params), k, dim=-1)
        return top.indices.tolist(), top.values.tolist()

    def _learn_shape(self, tree: DraftTree, accepted: list[int]) -> None:
        children = tree.layout.children
        at, depth = 0, 0
        chosen = set(accepted)
        while depth < self.max_depth and children[at]:
            hit = None
            for c in children[at]:
                rank = self.ranks[c]
                if rank < self.max_children:
                    self.tried[depth][rank] += 1
                if c in chosen:
                    hit = c
                    if rank < self.max_children:
                        self.hits[depth][rank] += 1
                    break
            if hit is None:
                break
            at, depth = hit + 1, depth + 1
