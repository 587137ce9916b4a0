"""Greedy verification (lossless): keep the longest path whose every token is the target's argmax,
then add the target's own next token. The committed tokens are exactly plain greedy decoding's."""
from __future__ import annotations

import torch

from ..tree import DraftTree
from .base import Verdict


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor) -> Verdict:
    choice = target_logits.argmax(-1)  # (B, N+1)
    layout = tree.layout
    accepted_all, tokens_all = [], []
    for b in range(choice.shape[0]):
        row = choice[b].tolist()
        drafted = tree.tokens[b].tolist()
        if layout.is_chain:
            m = 0
            while m < len(drafted) and drafted[m] == row[m]:
                m += 1
            nodes = list(range(m))
        else:
            nodes, at = [], 0  # `at` indexes rows: 0 = root, i+1 = node i
            while True:
                nxt = next((c for c in layout.children[at] if drafted[c] == row[at]), None)
                if nxt is None:
                    break
                nodes.append(nxt)
                at = nxt + 1
        last_row = nodes[-1] + 1 if nodes else 0
        accepted_all.append(nodes)
        tokens_all.append([drafted[n] for n in nodes] + [row[last_row]])
    return Verdict(accepted_nodes=accepted_all, tokens=tokens_all)
