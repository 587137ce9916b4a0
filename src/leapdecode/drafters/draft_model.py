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

`lookup=L` (greedy decoding) lets the draft model speculate for itself: before each of its one-token steps it
looks the drafted text up in the prompt and output (`pld`'s n-gram match) and feeds up to L copied tokens with
the step, in one pass; it keeps the copied tokens that equal its own greedy choices and crops the rest from its
cache. Its drafts are the tokens it would have drafted one by one (bitwise so where its passes are exact and
no draft vocabulary is used; a draft vocabulary's head is a float32 matmul, which may break a near-tie
differently), in fewer passes when the text copies its context (code edits).
"""
from __future__ import annotations

import numpy as np
import torch

from ..lm import CausalLM
from ..sampling import SamplingParams, probs_from_logits, sample
from ..tree import DraftTree
from .base import AdaptiveLength, DraftContext, DraftFeedback, Drafter
from .draft_vocab import DraftVocab
from .prompt_lookup import find_continuation


class DraftModelDrafter(Drafter):
    def __init__(
        self,
        model: torch.nn.Module,
        num_draft_tokens: int = 8,
        adaptive: bool = True,
        confidence_threshold: float = 0.4,
        draft_vocab: int = 0,
        lookup: int = 0,
    ):
        if lookup < 0:
            raise ValueError(f"lookup must be >= 0 (0 = off), got {lookup}")
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        if not 0.0 <= confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {confidence_threshold}")
        self.lm = CausalLM(model)
        self.length = AdaptiveLength(num_draft_tokens, high=max(32, num_draft_tokens), enabled=adaptive)
        self.confidence_threshold = confidence_threshold
        self.fed: list[int] = []  # tokens whose KV entries are in the draft cache, in order
        self.vocab = _draft_vocab(model, draft_vocab)
        self.lookup = lookup

    @property
    def forward_passes(self) -> int:
        return self.lm.forward_passes

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.lm.reset()
        self.fed = []
        self.length.reset()
        self._prompt = list(prompt)
        self._vocab_ready = False  # the request's draft vocabulary is set at its first proposal

    def _next_logits(self, ids: list[int], keep: int = 1) -> torch.Tensor:
        """Feed `ids` after the cache; the draft's logits after each of the last `keep` (keep, V)."""
        batch = torch.tensor([ids], dtype=torch.long)
        if self.vocab is None:
            return self.lm.forward(batch, logits_to_keep=keep)[0]
        return self.vocab.logits(self.lm.forward_hidden(batch, keep=keep)[0])

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
        logits = self._catch_up(ctx.tokens)[-1:]
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        pending: list[torch.Tensor] = []  # logits after copied tokens the draft model has checked already
        while True:
            if ctx.params.greedy:
                token = int(logits[0].argmax())
                q = None
            else:
                q = probs_from_logits(logits[0], ctx.params)  # (V,)
                token = int(sample(q, ctx.generator))
                probs.append(q)
            drafted.append(token)
            if len(drafted) == budget or token in ctx.stop_ids:  # nothing follows an end token
                break
            if self.confidence_threshold > 0:
                # BiLD fallback: the draft model is unsure of the token it just drafted; keep it (its logits
                # cost nothing more) but stop here and let the target decide.
                p = q if q is not None else logits[0].float().softmax(-1)
                if float(p[token]) < self.confidence_threshold:
                    break
            if pending:  # the token was a copied one the draft model chose too: its logits are known
                logits = pending.pop(0)
                continue
            pending = self._feed(ctx, token, drafted, budget) if q is None and self.lookup else []
            if pending:
                logits = pending.pop(0)
            else:
                logits = self._next_logits([token])
                self.fed.append(token)
        self._drop_unchosen(pending)
        draft_probs = torch.stack(probs) if probs else None  # greedy verification needs no probabilities
        return DraftTree.chain(torch.tensor(drafted, dtype=torch.long), draft_probs)

    def _feed(self, ctx: DraftContext, token: int, drafted: list[int], budget: int) -> list[torch.Tensor]:
        """Feed `token` with the copied tokens that follow it in the context (at most `lookup`) in one pass; the
        logits after `token` and after each copied token the draft model would choose itself, in order (their
        entries stay in its cache, the others are cropped). Nothing copied: [] (the caller feeds `token`)."""
        text = np.asarray(ctx.tokens + drafted, dtype=np.int64)
        found = find_continuation(text, 1, 3, min(self.lookup, budget - len(drafted)))
        if found is None or len(found[0]) == 0:
            return []
        copied = [int(t) for t in found[0]]
        rows = self._next_logits([token, *copied], keep=len(copied) + 1)
        self.fed.append(token)
        chosen = 0
        while chosen < len(copied) and int(rows[chosen].argmax()) == copied[chosen]:
            chosen += 1
        self.fed.extend(copied[:chosen])
        self.lm.crop(len(self.fed))
        return [rows[i:i + 1] for i in range(chosen + 1)]

    def _drop_unchosen(self, pending: list[torch.Tensor]) -> None:
        """Drafting stopped with copied tokens checked but not drafted (all but the first of `pending` follow
        a cached token that was not drafted): out of the cache, so `fed` stays what the cache holds."""
        if len(pending) > 1:
            self.fed = self.fed[:len(self.fed) - (len(pending) - 1)]
            self.lm.crop(len(self.fed))

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
