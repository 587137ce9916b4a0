"""`hydra`: sequentially dependent draft heads (lossless through tree verification).

Hydra (Ankner et al. 2024, "Hydra: Sequentially-Dependent Draft Heads for Medusa Decoding"). Like Medusa's
heads, head k reads the target's final hidden state h_t at the last verified position and predicts the token
at offset k+1; unlike them, it also reads the input embeddings of the tokens before it on its candidate path
(the committed root token x_{t+1} and the drafted x_{t+2..t+k}), so a tree is grown depth by depth with each
parent's own prefix. Hydra++ settings: `objective="distill"` trains on the target's distribution instead of
its tokens (teacher distillation; a training setting), `layers` adds residual blocks per head, and
`prefix_window` > 0 adds Hydra++'s extra decoder layer on the base features: one attention + MLP block whose
query is h_t and whose keys are the target's features of the last `prefix_window` committed positions, so the
heads read a summary of the recent context instead of h_t alone (a learned bias per distance stands in for
positions; the block starts as the identity).

Candidates are verified by the target in one tree pass, so the output is exactly the target's.
"""
from __future__ import annotations

import torch
from torch import nn

from ..runtime.quantized import module_device
from .base import DraftContext, DraftFeedback
from .medusa import DEFAULT_PATHS, FeatureDrafter, ResBlock


class PrefixAttention(nn.Module):
    """Hydra++'s extra decoder layer, for the last position only: the features of a window of W committed
    positions (B, W, H) -> an enhanced feature for the newest one (B, H). Pre-norm attention with a learned
    bias per head and distance, then a pre-norm MLP; both output projections start at zero (identity)."""

    def __init__(self, hidden_size: int, window: int, head_dim: int = 64):
        super().__init__()
        self.window = window
        self.num_heads = max(1, hidden_size // head_dim)
        self.head_dim = hidden_size // self.num_heads
        inner = self.num_heads * self.head_dim
        self.norm = nn.RMSNorm(hidden_size)
        self.q = nn.Linear(hidden_size, inner, bias=False)
        self.kv = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.o = nn.Linear(inner, hidden_size, bias=False)
        self.distance_bias = nn.Parameter(torch.zeros(self.num_heads, window))  # [:, d]: key d positions back
        self.mlp_norm = nn.RMSNorm(hidden_size)
        self.mlp_in = nn.Linear(hidden_size, 2 * hidden_size)
        self.mlp_out = nn.Linear(2 * hidden_size, hidden_size)
        for out in (self.o, self.mlp_out):
            nn.init.zeros_(out.weight)
        nn.init.zeros_(self.mlp_out.bias)

    def forward(self, window: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """window (B, W, H), oldest first, the newest position last; valid (B, W) marks real positions."""
        b, w, _ = window.shape
        if w > self.window:
            raise ValueError(f"window of {w} positions, the layer was built for {self.window}")
        x = self.norm(window)
        q = self.q(x[:, -1]).view(b, self.num_heads, 1, self.head_dim)
        k, v = self.kv(x).view(b, w, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, W, d) each
        bias = self.distance_bias[:, :w].flip(-1)[None, :, None, :]  # key j is w-1-j positions back
        mask = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
        ctx = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))  # (B, h, 1, d)
        h = window[:, -1] + self.o(ctx.reshape(b, -1))
        return h + self.mlp_out(nn.functional.silu(self.mlp_in(self.mlp_norm(h))))


class HydraHeads(nn.Module):
    """Head k: Linear([h_t, e(x_{t+1}), ..., e(x_{t+k})]) then residual blocks, then the frozen LM head.
    With `prefix_window`, h_t is first replaced by `PrefixAttention` over the recent features (`enhance`)."""

    kind = "hydra"
    conditions_on_tokens = True

    def __init__(self, hidden_size: int, num_heads: int = 4, layers: int = 1, prefix_window: int = 0):
        super().__init__()
        if prefix_window < 0:
            raise ValueError(f"prefix_window must be >= 0 (0 = no extra decoder layer), got {prefix_window}")
        self.num_heads = num_heads
        self.prefix_window = prefix_window
        self.prefix = PrefixAttention(hidden_size, prefix_window) if prefix_window else None
        self.inputs = nn.ModuleList(nn.Linear((k + 1) * hidden_size, hidden_size, bias=False)
                                    for k in range(1, num_heads + 1))
        with torch.no_grad():  # start as Medusa's identity on h_t; the token part is learned
            for lin in self.inputs:
                lin.weight.zero_()
                lin.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
        self.blocks = nn.ModuleList(nn.Sequential(*[ResBlock(hidden_size) for _ in range(layers)])
                                    for _ in range(num_heads))

    def enhance(self, window: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The feature the heads read: h_t itself (the window's last row) or the extra layer's output."""
        return window[:, -1] if self.prefix is None else self.prefix(window, valid)

    def head_state(self, k: int, feature: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """feature (P, H), embeds (P, k, H) of x_{t+1..t+k} -> state (P, H) for head k (1-based)."""
        x = torch.cat([feature, embeds.flatten(1)], dim=-1)
        return self.blocks[k - 1](self.inputs[k - 1](x))


class HydraDrafter(FeatureDrafter):
    def __init__(self, target, net: HydraHeads, paths=DEFAULT_PATHS, max_nodes: int = 64, vocab=None):
        super().__init__(target, net, paths, max_nodes, vocab)
        self.recent: torch.Tensor | None = None  # (W, H) features of the last committed positions (prefix layer)

    def begin(self, prompt: list[int], params) -> None:
        super().begin(prompt, params)
        self.recent = None

    def update(self, feedback: DraftFeedback) -> None:
        """Keep h_t; with the extra layer, also the features of every position committed this step (the root
        and the accepted nodes, i.e. rows 0 and 1 + node) and the enhanced feature of the newest one."""
        super().update(feedback)
        if self.feature is None:
            self.recent = None
        if self.net.prefix is None or self.feature is None:
            return
        rows = [0] + [1 + n for n in feedback.accepted_nodes]
        new = feedback.target_hidden[0, rows].detach().float()
        self.recent = new if self.recent is None else torch.cat([self.recent, new])
        self.recent = self.recent[-self.net.prefix_window:]
        with torch.no_grad():
            valid = torch.ones(1, len(self.recent), dtype=torch.bool, device=self.recent.device)
            self.feature = self.net.enhance(self.recent[None], valid)[0]

    def budget_paths(self, ctx: DraftContext) -> list[tuple[int, ...]]:
        return [p for p in super().budget_paths(ctx) if len(p) <= self.net.num_heads]

    def child_logits(self, depth: int, prefixes: list[list[int]], ctx: DraftContext) -> torch.Tensor:
        ids = torch.tensor([[ctx.tokens[-1]] + p for p in prefixes], dtype=torch.long)  # (P, depth)
        embeds = self.embed(ids.to(module_device(self.embed))).float()
        feature = self.feature[None].expand(len(prefixes), -1)
        self.forward_passes += 1
        return self.logits(self.net.head_state(depth, feature, embeds))
