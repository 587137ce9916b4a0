"""The target's LM head restricted to a draft vocabulary, for drafters that read it (medusa, hydra, falcon).

A trained head's state goes through the target's full LM head (V x H) at every drafting step; on a CPU that
matrix read is most of the drafter's time. Drafting only needs the tokens a draft is likely to be: the most
frequent tokens of the drafter's training answers (saved with the drafter by `train-drafter`) plus every
token of the request's prompt (copied names and numbers). Logits outside that set are -inf, so the drafter's
distribution is zero there; drafts stay proposals, and the target's verification keeps the output exactly
the target's (greedy: identical tokens; sampling: any draft distribution is corrected exactly).
"""
from __future__ import annotations

import torch


class DraftVocab:
    """`logits(states)` (P, H) -> (P, V): the LM head over `base` ids plus the prompt's, -inf elsewhere."""

    def __init__(self, lm_head: torch.nn.Module, base: torch.Tensor):
        self.lm_head = lm_head
        self.base = base.long().cpu()
        self.size = int(lm_head.weight.shape[0])
        if self.base.numel() and (int(self.base.min()) < 0 or int(self.base.max()) >= self.size):
            raise ValueError(f"draft vocabulary ids must be in [0, {self.size})")
        self.ids: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def begin(self, prompt: list[int]) -> None:
        """The request's set: the base ids and the prompt's tokens; gathers their LM-head rows once."""
        ids = torch.unique(torch.cat([self.base, torch.tensor(prompt, dtype=torch.long)]))
        ids = ids[(ids >= 0) & (ids < self.size)]
        weight = self.lm_head.weight
        self.ids = ids.to(weight.device)
        self.weight = weight.detach()[self.ids].contiguous()
        bias = getattr(self.lm_head, "bias", None)
        self.bias = None if bias is None else bias.detach()[self.ids]

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("DraftVocab.begin must be called first")
        sub = states.to(self.weight.dtype) @ self.weight.T  # (P, |ids|)
        if self.bias is not None:
            sub = sub + self.bias
        full = sub.new_full((states.shape[0], self.size), float("-inf"))
        full[:, self.ids] = sub
        return full


def frequent_tokens(tokens: torch.Tensor, limit: int) -> torch.Tensor:
    """The `limit` most frequent ids of `tokens` (all of them when fewer), sorted."""
    ids, counts = torch.unique(tokens.long(), return_counts=True)
    if len(ids) > limit:
        ids = ids[torch.argsort(counts, descending=True, stable=True)[:limit]]
    return torch.sort(ids).values
