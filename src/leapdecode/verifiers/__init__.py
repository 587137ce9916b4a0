"""Verifiers: read a draft tree and the target's logits for every node, return what is accepted.

`verify` picks greedy verification for temperature 0; under sampling, exact speculative sampling for a
chain, SpecTr's k-sequential selection for a `MultiDraftTree` (k independent drafts), and recursive
rejection sampling for any other branching tree. With a relaxed acceptance `rule` (lossy, `relaxed.py`), the
same walks also keep the drafted tokens the rule admits.
"""
from __future__ import annotations

import torch

from ..sampling import SamplingParams
from ..tree import DraftTree
from .base import Verdict
from .greedy import verify_greedy
from .kseq import MultiDraftTree, verify_kseq
from .relaxed import AcceptanceRule, verify_relaxed
from .speculative_sampling import verify_sampling
from .tree_sampling import verify_tree_sampling


def verify(
    tree: DraftTree, target_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
    rule: AcceptanceRule | None = None,
) -> Verdict:
    """target_logits: (B, N+1, V), row 0 after the root, row i+1 after node i."""
    if rule is not None:
        return verify_relaxed(tree, target_logits, params, generator, rule)
    if params.greedy:
        return verify_greedy(tree, target_logits)
    if isinstance(tree, MultiDraftTree) and tree.drafts:
        return verify_kseq(tree, target_logits, params, generator)
    if tree.layout.is_chain:
        return verify_sampling(tree, target_logits, params, generator)
    return verify_tree_sampling(tree, target_logits, params, generator)


__all__ = ["AcceptanceRule", "MultiDraftTree", "Verdict", "verify", "verify_greedy", "verify_kseq", "verify_relaxed",
           "verify_sampling", "verify_tree_sampling"]
