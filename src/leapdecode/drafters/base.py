"""The drafter protocol: propose a tree of candidate tokens, learn from what the target accepted."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..sampling import SamplingParams
from ..tree import DraftTree


@dataclass
class DraftContext:
    """What a drafter may read when proposing (batch size 1: one committed token list)."""

    tokens: list[int]  # prompt + committed output; the last one is fed to the target with the draft
    prompt_length: int
    max_tokens: int  # proposal budget: at most this many nodes in the tree
    params: SamplingParams
    generator: torch.Generator | None
    stop_ids: frozenset[int] = frozenset()  # EOS / end-of-turn ids: drafting past one is wasted work


@dataclass
class DraftFeedback:
    """What the target decided about the last proposal (batch size 1)."""

    proposed: int  # nodes in the proposed tree
    accepted: int  # accepted nodes (the correction/bonus token is not counted)
    committed: list[int] = field(default_factory=list)  # tokens committed this step
    accepted_nodes: list[int] = field(default_factory=list)  # tree node indices on the accepted path
    tree: DraftTree | None = None  # the proposal itself (None when nothing was proposed)
    # (1, N+1, V): row 0 after the root, row i+1 after node i (on the target's device under greedy)
    target_logits: torch.Tensor | None = None
    # (1, N+1, H) the target's final (post-norm) hidden states, same rows as target_logits; only for drafters
    # that set `needs_target_hidden = True` (feature drafters: medusa, hydra, falcon), else None
    target_hidden: torch.Tensor | None = None


class Drafter(Protocol):
    """One instance per generation request; `begin` is called once with the prompt."""

    def begin(self, prompt: list[int], params: SamplingParams) -> None: ...

    def propose(self, ctx: DraftContext) -> DraftTree | None: ...

    def update(self, feedback: DraftFeedback) -> None: ...


class NoDrafter:
    """Plain autoregressive decoding: proposes nothing, so each target pass commits one token."""

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        pass

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        return None

    def update(self, feedback: DraftFeedback) -> None:
        pass


class AdaptiveLength:
    """Draft length from acceptance feedback: grow after a fully accepted draft (for a tree: the accepted path
    reached a leaf), shrink after a miss (the schedule of transformers' assisted generation heuristic, bounded
    to [low, high])."""

    def __init__(self, start: int, low: int = 1, high: int = 64, enabled: bool = True):
        self.start, self.low, self.high, self.enabled = start, low, high, enabled
        self.value = start

    def reset(self) -> None:
        """Back to the starting length (each request starts afresh, so seeded runs repeat exactly)."""
        self.value = self.start

    def update(self, feedback: DraftFeedback) -> None:
        if not self.enabled or feedback.proposed == 0:
            return
        if feedback.accepted == feedback.proposed or (
                feedback.tree is not None and feedback.tree.ends_at_leaf(feedback.accepted_nodes)):
            self.value = min(self.high, self.value + 2)
        else:
            self.value = max(self.low, self.value - 1)
