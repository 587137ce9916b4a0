"""`lookahead`: Jacobi iterations plus an n-gram pool (Lookahead decoding, Fu et al. 2024; the Jacobi
decoding that CEED-VLA accelerates). Model-free, lossless through verification.

A window of `window` guessed future tokens rides along with every verification pass as one branch of the
draft tree. The target's argmax after each window position is the next Jacobi iterate of the guess for the
following position (a fixed-point iteration y_{j+1} <- argmax p(. | x, y_1..y_j)); after the commit the
window is shifted past the committed tokens and refilled with those iterates.

Choice (documented, as the issue allows): the n-grams come from the target's own logits on the drafted
positions of the verification pass itself, not from extra Jacobi-only nodes: for every tree node, its last
`ngram - 1` path tokens followed by the target's argmax after it form an n-gram, and so does every run of
committed tokens. The pool keys n-grams by their first token (most recent first, `pool_per_key` per key);
the n-grams starting with the last committed token become further branches. All nodes are point masses
(deterministic given the committed text), so the tree verifier is exact under sampling too.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict

from ..sampling import SamplingParams
from ..tree import DraftTree
from .base import DraftContext, DraftFeedback, Drafter
from .trie import TreeBudget, trie_from_sequences


class LookaheadDrafter(Drafter):
    def __init__(self, window: int = 5, ngram: int = 4, max_candidates: int = 4, pool_per_key: int = 8,
                 max_nodes: int = 24, adaptive: bool = True):
        if window < 0 or ngram < 2 or max_candidates < 0 or pool_per_key < 1 or max_nodes < 1:
            raise ValueError("need window >= 0, ngram >= 2, max_candidates >= 0, pool_per_key >= 1, max_nodes >= 1")
        self.window_size, self.ngram, self.max_candidates = window, ngram, max_candidates
        self.pool_per_key = pool_per_key
        self.budget = TreeBudget(max_nodes, low=max(2, window), high=max(2 * max_nodes, 8), enabled=adaptive)

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.pool: dict[int, OrderedDict[tuple[int, ...], None]] = defaultdict(OrderedDict)
        self._add_run(prompt)
        self.window: list[int] = []
        self.window_nodes: list[int] = []
        self.history = list(prompt[-self.ngram:])
        self.budget.reset()

    def _add(self, gram: tuple[int, ...]) -> None:
        bucket = self.pool[gram[0]]
        bucket.pop(gram, None)
        bucket[gram] = None
        while len(bucket) > self.pool_per_key:
            bucket.popitem(last=False)

    def _add_run(self, tokens: list[int]) -> None:
        for i in range(len(tokens) - self.ngram + 1):
            self._add(tuple(tokens[i : i + self.ngram]))

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        budget = min(self.budget.value, ctx.max_tokens)
        if budget <= 0:
            return None
        last = ctx.tokens[-1]
        candidates = [list(g[1:]) for g in reversed(self.pool.get(last, {}))][: self.max_candidates]
        window = self.window[: min(self.window_size, budget)]
        # the window first (its node indices are then 0..len-1), then the pool's n-grams
        tree = trie_from_sequences([window] + candidates if window else candidates, budget)
        self.window_nodes = list(range(len(window)))
        return tree

    def update(self, feedback: DraftFeedback) -> None:
        tree, logits = feedback.tree, feedback.target_logits
        committed = list(feedback.committed)
        context = self.history + committed
        self._add_run(context)
        if tree is not None and tree.size and logits is not None:
            guess = logits[0].argmax(-1).tolist()  # (N+1,) target's next token after root / each node
            tokens = tree.tokens[0].tolist()
            for node in range(tree.size):  # n-grams from the target's logits on drafted positions
                path, at = [], node
                while at != -1 and len(path) < self.ngram - 1:
                    path.append(tokens[at])
                    at = tree.parents[at]
                if len(path) == self.ngram - 1:
                    self._add(tuple(path[::-1]) + (guess[node + 1],))
            # Jacobi step on the window: iterates after each window position, shifted past the commit
            # (the engine may have cut the chain after an end token: only the nodes it verified count)
            iterates = [guess[0]] + [guess[n + 1] for n in self.window_nodes if n < tree.size]
            self.window = iterates[len(committed):]
        else:
            self.window = []
        if len(self.window) < self.window_size:  # refill the tail from the pool (or repeat the last guess)
            tail = (context + self.window)[-1]
            extra = next(reversed(self.pool.get(tail, {})), None)
            if extra:
                self.window += list(extra[1:])
        self.window = self.window[: self.window_size]
        self.history = context[-self.ngram:]
        self.budget.update(tree, feedback.accepted_nodes)
