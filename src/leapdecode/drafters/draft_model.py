"""`draft`: a smaller model with the same tokenizer drafts K tokens (lossless through verification).

Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), with BiLD's fallback policy as an option
(Kim et al., "Speculative Decoding with Big Little Decoder", 2023): stop drafting early when the draft
model's confidence in its own token drops below a threshold. The draft model keeps its own KV cache in
step with the committed text: before drafting, it is cropped to the longest prefix it shares with the
committed tokens and fed the rest.

`draft_vocab=K` drafts from a vocabulary subset: the first K token ids (byte-pair and sentencepiece
vocabularies put their most frequent tokens first), the end tokens and the prompt's tokens; the draft model
then reads only those rows of its LM head, a quarter of a 0.5B model's weights when the vocabulary is 152k.
Drafts stay proposals and the target verifies them, so the output is unchanged (see draft_vocab.py).
"""
from __future__ import annotations

import torch

from ..lm import CausalLM
from ..sampling import SamplingParams, probs_from_logits, sample
from ..tree import DraftTree
from .base import AdaptiveLength, DraftContext, DraftFeedback, Drafter
from .draft_vocab import DraftVocab


class DraftModelDrafter(Drafter):
    def __init__(
        self,
        model: torch.nn.Module,
        num_draft_tokens: int = 8,
        adaptive: bool = True,
        confidence_threshold: float = 0.4,
        draft_vocab: int = 0,
    ):
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        if not 0.0 <= confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {confidence_threshold}")
        self.lm = CausalLM(model)
        self.length = AdaptiveLength(num_draft_tokens, high=max(32, num_draft_tokens), enabled=adaptive)
        self.confidence_threshold = confidence_threshold
        self.fed: list[int] = []  # tokens whose KV entries are in the draft cache, in order
        self.vocab = _draft_vocab(model, draft_vocab)

    @property
    def forward_passes(self) -> int:
        return self.lm.forward_passes

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.lm.reset()
        self.fed = []
        self.length.reset()
        self._prompt = list(prompt)
        self._vocab_ready = False  # the request's draft vocabulary is set at its first proposal

    def _next_logits(self, ids: list[int]) -> torch.Tensor:
        """Feed `ids` after the cache; the draft's logits after the last one (1, V)."""
        batch = torch.tensor([ids], dtype=torch.long)
        if self.vocab is None:
            return self.lm.forward(batch, logits_to_keep=1)[:, -1]
        return self.vocab.logits(self.lm.forward_hidden(batch)[:, -1])

    def _catch_up(self, tokens: list[int]) -> torch.Tensor:
        """Make the cache hold `tokens[:-1]` plus feed the last token; return logits after it (1, V)."""
        common = 0
        limit = min(len(self.fed), len(tokens) - 1)
        while common < limit and self.fed[common] == tokens[common]:
            common += 1
        self.lm.crop(common)
        logits = self._next_logits(tokens[common:])
        self.fed = list(tokens)
        return logits

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        budget = min(self.length.value, ctx.max_tokens)
        if budget <= 0:
            return None
        if self.vocab is not None and not self._vocab_ready:  # the end tokens join the prompt's
            self.vocab.begin(self._prompt + sorted(ctx.stop_ids))
            self._vocab_ready = True
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
            logits = self._next_logits([token])
            self.fed.append(token)
        draft_probs = torch.stack(probs) if probs else None  # greedy verification needs no probabilities
        return DraftTree.chain(torch.tensor(drafted, dtype=torch.long), draft_probs)

    def update(self, feedback: DraftFeedback) -> None:
        self.length.update(feedback)


def _draft_vocab(model: torch.nn.Module, size: int) -> DraftVocab | None:
    """The first `size` ids as a draft vocabulary (0: the full vocabulary, the default, because answers in
    other languages and math use tokens past the first ids; the README has the Qwen pair's figures). Refused
    where the logits are not the LM head's plain output (logit soft-capping or scaling)."""
    if size < 0:
        raise ValueError(f"draft_vocab must be >= 0 (0 = the full vocabulary), got {size}")
    head = model.get_output_embeddings()
    if size == 0 or size >= head.out_features:
        return None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        raise ValueError("draft_vocab needs a draft model whose logits are its LM head's output "
                         "(this one caps or scales them)")
    return DraftVocab(head, torch.arange(size))
