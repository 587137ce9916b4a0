"""The drafter interface: the `Drafter` base class (propose a tree of candidate tokens, learn from what the
target accepted, and the capabilities a drafter declares) and the records it reads and returns."""
from __future__ import annotations

from dataclasses import dataclass, field
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
    # that set `needs_target_hidden = True` (feature drafters: medusa, hydra, falcon), else None; the input of
    # decoder layer `Drafter.target_hidden_layer` instead when the drafter names one (hidden transfer)
    target_hidden: torch.Tensor | None = None


class Drafter:
    """The base of every drafter; one instance per generation request (`begin` is called once with the prompt).

    What a drafter can do is declared here, as class attributes a drafter overrides, so the engine reads
    them directly:
    - `needs_target_hidden`: the drafter reads the target's final hidden states (`DraftFeedback.target_hidden`;
      feature drafters: medusa, hydra, falcon), so the step asks the target pass for them;
    - `target_hidden_layer`: which of the model's hidden states `target_hidden` then carries, as an index into
      transformers' `hidden_states`: -1 (default) the final, post-norm states; i >= 1 the input of decoder
      layer i, i.e. the output of the first i layers (hidden transfer reads an intermediate layer);
    - `forward_passes`: forward passes of a draft network so far in this request (0 for model-free drafters;
      an attribute or a property);
    - `cuttable`: the engine's draft cut may verify only a prefix of this drafter's trees (false for SpecTr,
      whose k-sequential rule needs its k whole drafts).
    - `acceptance`: a relaxed acceptance rule the verifier applies to this drafter's trees (lossy methods
      `BASE+RULE`, `verifiers/relaxed.py`); None: exact verification.
    The base proposes nothing: it is plain decoding (`NoDrafter`).
    """

    needs_target_hidden: bool = False
    target_hidden_layer: int = -1
    forward_passes: int = 0
    cuttable: bool = True
    acceptance = None

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        pass

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        return None

    def update(self, feedback: DraftFeedback) -> None:
        pass


class NoDrafter(Drafter):
    """Plain autoregressive decoding: proposes nothing, so each target pass commits one token."""


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
