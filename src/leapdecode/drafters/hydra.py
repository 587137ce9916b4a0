"""`hydra`: sequentially dependent draft heads (lossless through tree verification).

Hydra (Ankner et al. 2024, "Hydra: Sequentially-Dependent Draft Heads for Medusa Decoding"). Like Medusa's
heads, head k reads the target's final hidden state h_t at the last verified position and predicts the token
at offset k+1; unlike them, it also reads the input embeddings of the tokens before it on its candidate path
(the committed root token x_{t+1} and the drafted x_{t+2..t+k}), so a tree is grown depth by depth with each
parent's own prefix. Hydra++ settings: `objective="distill"` trains on the target's distribution instead of
its tokens (teacher distillation; a training setting), `layers` adds residual blocks per head.

Candidates are verified by the target in one tree pass, so the output is exactly the target's.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import DraftContext
from .medusa import DEFAULT_PATHS, FeatureDrafter, ResBlock


class HydraHeads(nn.Module):
    """Head k: Linear([h_t, e(x_{t+1}), ..., e(x_{t+k})]) then residual blocks, then the frozen LM head."""

    kind = "hydra"
    conditions_on_tokens = True

    def __init__(self, hidden_size: int, num_heads: int = 4, layers: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.inputs = nn.ModuleList(nn.Linear((k + 1) * hidden_size, hidden_size, bias=False)
                                    for k in range(1, num_heads + 1))
        with torch.no_grad():  # start as Medusa's identity on h_t; the token part is learned
            for lin in self.inputs:
                lin.weight.zero_()
                lin.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
        self.blocks = nn.ModuleList(nn.Sequential(*[ResBlock(hidden_size) for _ in range(layers)])
                                    for _ in range(num_heads))

    def head_state(self, k: int, feature: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """feature (P, H), embeds (P, k, H) of x_{t+1..t+k} -> state (P, H) for head k (1-based)."""
        x = torch.cat([feature, embeds.flatten(1)], dim=-1)
        return self.blocks[k - 1](self.inputs[k - 1](x))


class HydraDrafter(FeatureDrafter):
    def __init__(self, target, net: HydraHeads, paths=DEFAULT_PATHS, max_nodes: int = 64):
        super().__init__(target, net, paths, max_nodes)

    def budget_paths(self, ctx: DraftContext) -> list[tuple[int, ...]]:
        return [p for p in super().budget_paths(ctx) if len(p) <= self.net.num_heads]

    def child_logits(self, depth: int, prefixes: list[list[int]], ctx: DraftContext) -> torch.Tensor:
        ids = torch.tensor([[ctx.tokens[-1]] + p for p in prefixes], dtype=torch.long)  # (P, depth)
        embeds = self.embed(ids.to(self.embed.weight.device)).float()
        feature = self.feature[None].expand(len(prefixes), -1)
        self.forward_passes += 1
        return self.logits(self.net.head_state(depth, feature, embeds))
