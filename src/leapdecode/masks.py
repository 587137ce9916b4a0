"""The one attention-mask builder: chain, tree, ragged batch and sliding window.

A pass feeds q query tokens per row after C cache columns. Row b's mask (True = may attend) is

    cache part (q, C):  `past_valid[b]`, the columns that hold a committed token of that row
                        (all of them for one sequence; a ragged batch has holes and left padding)
    new part   (q, q):  `block[b]`, which of this pass's tokens each query sees (a chain: lower
                        triangular; a tree: the ancestor mask; padding: only itself)

Models with sliding-window layers (gemma3) get a second mask for those layers: the same, limited to keys
whose position is within the window of the query's position. A key's position in the cache is the number of
valid columns before it, so holes never shift positions.
"""
from __future__ import annotations

import torch


def attention_masks(past_valid: torch.Tensor, block: torch.Tensor, positions: torch.Tensor,
                    sliding_window: int | None = None) -> dict[str, torch.Tensor]:
    """past_valid (B, C) bool; block (B, q, q) bool; positions (B, q) int64, the query tokens' positions.
    Returns {layer type: (B, 1, q, C+q) bool}: "full_attention", plus "sliding_attention" with a window."""
    q = block.shape[1]
    full = torch.cat([past_valid.unsqueeze(1).expand(-1, q, -1), block], 2).unsqueeze(1)  # (B, 1, q, C+q)
    masks = {"full_attention": full}
    if sliding_window is not None:
        key_pos = torch.cat([past_valid.long().cumsum(1) - 1, positions], 1)  # (B, C+q)
        in_window = key_pos.unsqueeze(1) > positions.unsqueeze(2) - sliding_window  # (B, q, C+q)
        masks["sliding_attention"] = full & in_window.unsqueeze(1)
    return masks
