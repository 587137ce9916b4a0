"""`spectr`: k independent drafts from a draft model, verified with SpecTr's exact k-sequential selection
(Sun et al., "SpecTr: Fast Speculative Decoding via Optimal Transport", 2023). Lossless.

Each round draws `num_drafts` sequences of length L independently from the draft model (at the target's
sampling settings; under greedy, from the draft's plain softmax, for diversity) and merges them into a trie
(`MultiDraftTree`, which remembers each draft's node path). All drafts advance one token per draft-model
pass: the trie so far is scored in one forward with tree attention. Verification: `verifiers/kseq.py`
(greedy: the longest path of target argmaxes). L adapts to acceptance: +1 when a draft was accepted to its
end, -1 when nothing was accepted.
"""
from __future__ import annotations

import torch

from ..sampling import SamplingParams, probs_from_logits, sample
from ..verifiers.kseq import MultiDraftTree
from .base import DraftContext, DraftFeedback, Drafter
from .draft_tree import DraftTreeScorer
from .trie import TreeBuilder

_PLAIN = SamplingParams(temperature=1.0)


class SpecTrDrafter(Drafter):
    cuttable = False  # the k-sequential rule needs the k whole drafts (`MultiDraftTree.prefix` refuses too)

    def __init__(self, model: torch.nn.Module, num_drafts: int = 3, num_draft_tokens: int = 4, adaptive: bool = True):
        if num_drafts < 1 or num_draft_tokens < 1:
            raise ValueError("num_drafts and num_draft_tokens must be >= 1")
        self.scorer = DraftTreeScorer(model)
        self.num_drafts, self.start_length, self.adaptive = num_drafts, num_draft_tokens, adaptive
        self.length = num_draft_tokens

    @property
    def forward_passes(self) -> int:
        return self.scorer.lm.forward_passes

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.scorer.reset()
        self.length = self.start_length

    def propose(self, ctx: DraftContext) -> MultiDraftTree | None:
        k = min(self.num_drafts, ctx.max_tokens)
        length = min(self.length, ctx.max_tokens // k)
        if k <= 0 or length <= 0:
            return None
        params = ctx.params if not ctx.params.greedy else _PLAIN
        builder = TreeBuilder()
        at = [-1] * k  # each draft's current node
        paths: list[list[int]] = [[] for _ in range(k)]
        for _ in range(length):
            logits = self.scorer.score(ctx.tokens, builder)
            q_rows = probs_from_logits(logits, params)  # (N+1, V)
            for j in range(k):
                q = q_rows[at[j] + 1]
                token = int(sample(q, ctx.generator))  # independent draws, with replacement
                node = builder.child(at[j], token)
                if node is None:
                    node = builder.add(at[j], token, q)
                at[j] = node
                paths[j].append(node)
        return MultiDraftTree(tokens=torch.tensor([builder.tokens], dtype=torch.long), parents=tuple(builder.parents),
                              draft_probs=torch.stack(builder.probs).unsqueeze(0), drafts=tuple(map(tuple, paths)))

    def update(self, feedback: DraftFeedback) -> None:
        if not self.adaptive or feedback.tree is None or feedback.tree.size == 0:
            return
        if feedback.accepted >= self.length:
            self.length = min(16, self.length + 1)
        elif feedback.accepted == 0:
            self.length = max(1, self.length - 1)
