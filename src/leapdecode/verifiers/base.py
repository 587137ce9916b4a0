"""The verification result record."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Verdict:
    """Per sequence of the batch: the accepted tree nodes (root-to-leaf order) and the tokens to commit
    (the accepted nodes' tokens followed by one token chosen by the target: the correction or bonus)."""

    accepted_nodes: list[list[int]]  # (B, ragged)
    tokens: list[list[int]]  # (B, ragged): len = len(accepted_nodes[b]) + 1
