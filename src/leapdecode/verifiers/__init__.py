"""Verifiers: read a draft tree and the target's logits for every node, return what is accepted.

`verify` picks greedy verification for temperature 0 and exact speculative sampling otherwise.
"""
from __future__ import annotations

import torch

from ..sampling import SamplingParams
from ..tree import DraftTree
from .base import Verdict
from .greedy import verify_greedy
from .speculative_sampling import verify_sampling


def verify(
    tree: DraftTree, target_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> Verdict:
    """target_logits: (B, N+1, V), row 0 after the root, row i+1 after node i."""
    if params.greedy:
        return verify_greedy(tree, target_logits)
    return verify_sampling(tree, target_logits, params, generator)


__all__ = ["Verdict", "verify", "verify_greedy", "verify_sampling"]
