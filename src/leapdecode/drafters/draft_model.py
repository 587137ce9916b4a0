"""`draft`: a smaller model with the same tokenizer drafts K tokens (lossless through verification).

Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), with BiLD's fallback policy as an option
(Kim et al., "Speculative Decoding with Big Little Decoder", 2023): stop drafting early when the draft
model's confidence in its own token drops below a threshold. The draft model keeps its own KV cache in
step with the committed text: before drafting, it is cropped to the longest prefix it shares with the
committed tokens and fed the rest.
"""
from __future__ import annotations

import torch

from ..lm import CausalLM
from ..sampling import SamplingParams, probs_from_logits, sample
from ..tree import DraftTree
from .base import AdaptiveLength, DraftContext, DraftFeedback


class DraftModelDrafter:
    def __init__(
        self,
        model: torch.nn.Module,
        num_draft_tokens: int = 8,
        adaptive: bool = True,
        confidence_threshold: float = 0.4,
    ):
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        if not 0.0 <= confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {confidence_threshold}")
        self.lm = CausalLM(model)
        self.length = AdaptiveLength(num_draft_tokens, high=max(32, num_draft_tokens), enabled=adaptive)
        self.confidence_threshold = confidence_threshold
        self.fed: list[int] = []  # tokens whose KV entries are in the draft cache, in order

    @property
    def forward_passes(self) -> int:
        return self.lm.forward_passes

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.lm.reset()
        self.fed = []
        self.length.reset()

    def _catch_up(self, tokens: list[int]) -> torch.Tensor:
        """Make the cache hold `tokens[:-1]` plus feed the last token; return logits after it (1, V)."""
        common = 0
        limit = min(len(self.fed), len(tokens) - 1)
        while common < limit and self.fed[common] == tokens[common]:
            common += 1
        self.lm.crop(common)
        new = tokens[common:]
        logits = self.lm.forward(torch.tensor([new], dtype=torch.long), logits_to_keep=1)[:, -1]
        self.fed = list(tokens)
        return logits

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        budget = min(self.length.value, ctx.max_tokens)
        if budget <= 0:
            return None
        logits = self._catch_up(ctx.tokens)
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        for k in range(budget):
            if ctx.params.greedy:
                token = int(logits[0].argmax())
                q = None
            else:
                q = probs_from_logits(logits[0], ctx.params)  # (V,)
                token = int(sample(q, ctx.generator))
                probs.append(q)
            drafted.append(token)
            if k + 1 == budget or token in ctx.stop_ids:  # nothing follows an end token
                break
            if self.confidence_threshold > 0:
                # BiLD fallback: the draft model is unsure of the token it just drafted; keep it (its logits
                # cost nothing more) but stop here and let the target decide.
                p = q if q is not None else logits[0].float().softmax(-1)
                if float(p[token]) < self.confidence_threshold:
                    break
            logits = self.lm.forward(torch.tensor([[token]], dtype=torch.long))[:, -1]
            self.fed.append(token)
        draft_probs = torch.stack(probs) if probs else None  # greedy verification needs no probabilities
        return DraftTree.chain(torch.tensor(drafted, dtype=torch.long), draft_probs)

    def update(self, feedback: DraftFeedback) -> None:
        self.length.update(feedback)
