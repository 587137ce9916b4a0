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
    """`logits(states)` (P, H) -> (P, V): the LM head over `base` ids plus the prompt's, -inf elsewhere.
    The base rows are gathered once (at the first request); each request adds only its prompt's other ids."""

    def __init__(self, lm_head: torch.nn.Module, base: torch.Tensor):
        self.lm_head = lm_head
        self.size = int(lm_head.out_features)
        self.base = torch.unique(base.long().cpu())
        if self.base.numel() and (int(self.base[0]) < 0 or int(self.base[-1]) >= self.size):
            raise ValueError(f"draft vocabulary ids must be in [0, {self.size})")
        self._base_rows: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.ids: torch.Tensor | None = None  # base ids, then the request's extra ids
        self._extra_rows: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight rows, bias entries or None) of the LM head for `ids` (on the head's device)."""
        weight, bias = self.lm_head.weight.detach(), getattr(self.lm_head, "bias", None)
        ids = ids.to(weight.device)
        return weight[ids].contiguous(), None if bias is None else bias.detach()[ids]

    def begin(self, prompt: list[int]) -> None:
        """The request's set: the base ids and the prompt's tokens."""
        if self._base_rows is None:
            self._base_rows = self._rows(self.base)
        extra = torch.unique(torch.tensor(prompt, dtype=torch.long))
        extra = extra[(extra >= 0) & (extra < self.size) & ~torch.isin(extra, self.base)]
        self._extra_rows = self._rows(extra)
        self.ids = torch.cat([self.base, extra]).to(self.lm_head.weight.device)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        if self.ids is None:
            raise RuntimeError("DraftVocab.begin must be called first")
        parts = []
        for weight, bias in (self._base_rows, self._extra_rows):
            part = states.to(weight.dtype) @ weight.T
            parts.append(part if bias is None else part + bias)
        full = states.new_full((states.shape[0], self.size), float("-inf"), dtype=parts[0].dtype)
        full[:, self.ids] = torch.cat(parts, dim=-1)
        return full


def frequent_tokens(tokens: torch.Tensor, limit: int) -> torch.Tensor:
    """The `limit` most frequent ids of `tokens` (all of them when fewer), sorted."""
    ids, counts = torch.unique(tokens.long(), return_counts=True)
    if len(ids) > limit:
        ids = ids[torch.argsort(counts, descending=True, stable=True)[:limit]]
    return torch.sort(ids).values
