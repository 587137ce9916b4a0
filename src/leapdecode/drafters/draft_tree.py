"""`draft-tree`: a draft model grows a token tree where it is unsure (lossless through verification).

Dynamic, confidence-driven expansion (in the spirit of SpecInfer's token trees and EAGLE-2's dynamic trees):
each round scores the whole tree built so far with the draft model in one forward pass (tree attention
through `CausalLM.score_tree`), then gives the remaining node budget to the slots of highest estimated
reach probability: slot j of a frontier node v is worth reach(v) * (j-th largest draft probability at v).
The number of children of each node is fixed from these values *before* its children are drawn, so under
sampling the children are Gumbel-top-k draws (without replacement) from the draft distribution, and their
sibling conditionals go to `DraftTree.draft_probs` for the exact recursive-rejection tree verifier; under
greedy they are the draft's top tokens. A confident draft model grows a deep chain, an unsure one a bushy
tree. The node budget adapts to acceptance (grow when a leaf was reached, shrink after a miss).
"""
from __future__ import annotations

import torch

from ..lm import CausalLM
from ..sampling import SamplingParams, gumbel_top_k, probs_from_logits
from ..tree import DraftTree
from ..verifiers.tree_sampling import without_replacement
from .base import DraftContext, DraftFeedback, Drafter
from .trie import TreeBudget, TreeBuilder

_PLAIN = SamplingParams(temperature=1.0)  # the draft's confidence under greedy settings


class DraftTreeScorer:
    """The draft model's cache kept at the committed text minus its last token; scores any tree rooted
    at the last committed token in one pass and crops the cache back afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.lm = CausalLM(model)
        self.fed: list[int] = []

    def reset(self) -> None:
        self.lm.reset()
        self.fed = []

    def score(self, tokens: list[int], builder: TreeBuilder) -> torch.Tensor:
        """Logits (N+1, V): row 0 after the last committed token, row i+1 after node i's path."""
        prefix = tokens[:-1]
        common = 0
        while common < min(len(self.fed), len(prefix)) and self.fed[common] == prefix[common]:
            common += 1
        self.lm.crop(common)
        if common < len(prefix):
            self.lm.forward(torch.tensor([prefix[common:]], dtype=torch.long), logits_to_keep=1)
        self.fed = list(prefix)
        tree = DraftTree(tokens=torch.tensor([builder.tokens], dtype=torch.long).reshape(1, -1),
                         parents=tuple(builder.parents))
        logits = self.lm.score_tree(torch.tensor([[tokens[-1]]], dtype=torch.long), tree)[0]
        self.lm.crop(len(prefix))
        return logits


class DraftTreeDrafter(Drafter):
    def __init__(self, model: torch.nn.Module, max_nodes: int = 16, max_depth: int = 8, max_children: int = 4,
                 min_reach: float = 0.02, adaptive: bool = True):
        if max_nodes < 1 or max_depth < 1 or max_children < 1:
            raise ValueError("max_nodes, max_depth and max_children must be >= 1")
        if not 0.0 <= min_reach < 1.0:
            raise ValueError(f"min_reach must be in [0, 1), got {min_reach}")
        self.scorer = DraftTreeScorer(model)
        self.max_depth, self.max_children, self.min_reach = max_depth, max_children, min_reach
        self.budget = TreeBudget(max_nodes, low=2, high=max(2 * max_nodes, 8), enabled=adaptive)

    @property
    def forward_passes(self) -> int:
        return self.scorer.lm.forward_passes

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.scorer.reset()
        self.budget.reset()

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        budget = min(self.budget.value, ctx.max_tokens)
        if budget <= 0:
            return None
        sampling = not ctx.params.greedy
        builder = TreeBuilder()
        frontier = {-1: 1.0}  # node -> estimated reach probability
        for _ in range(self.max_depth):
            if not frontier or len(builder) >= budget:
                break
            logits = self.scorer.score(ctx.tokens, builder)
            dists = {v: probs_from_logits(logits[v + 1], ctx.params if sampling else _PLAIN) for v in frontier}
            # slot values from the sorted draft probabilities only (not from the tokens drawn below)
            slots = []
            for v, reach in frontier.items():
                top = torch.topk(dists[v], self.max_children).values.tolist()
                slots += [(reach * s, v) for s in top if reach * s >= self.min_reach or v == -1 and s == top[0]]
            slots.sort(key=lambda s: -s[0])
            counts: dict[int, int] = {}
            for _, v in slots[: budget - len(builder)]:
                counts[v] = counts.get(v, 0) + 1
            new_frontier = {}
            for v, k in counts.items():
                q = dists[v]
                drawn = gumbel_top_k(q, k, ctx.generator) if sampling else torch.topk(q, k).indices.tolist()
                conditionals = without_replacement(q, drawn) if sampling else [None] * k
                for rank, token in enumerate(drawn):
                    child = builder.add(v, token, conditionals[rank])
                    new_frontier[child] = frontier[v] * float(q[token])
            frontier = new_frontier
        return builder.build()

    def update(self, feedback: DraftFeedback) -> None:
        self.budget.update(feedback.tree, feedback.accepted_nodes)
