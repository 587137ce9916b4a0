"""`medusa`: K draft heads on the target's last hidden state (lossless through tree verification).

Medusa (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads"),
the baseline of the Hydra paper. Head k reads the target's final (post-norm) hidden state h_t at the last
verified position and predicts the token at offset k+1 (the target's own LM head gives offset 1, which the
engine has already committed as the root of the next tree). The heads are sequentially independent: each is a
residual block on h_t followed by the target's frozen LM head. The candidates are each head's top tokens,
arranged by a Medusa path list (`[[0], [1], [0, 0], ...]`: the k-th candidate at each depth), and the target
verifies the whole tree in one pass, so the output is exactly the target's (greedy: identical tokens;
sampling: children are drawn without replacement from the head's distribution and verified by recursive
rejection sampling).

This module also holds what the feature drafters share: `FeatureDrafter` (keeps the hidden state of the last
accepted node from the engine's feedback) and `grow_tree` (a path list filled depth by depth).
"""
from __future__ import annotations

import torch
from torch import nn

from ..sampling import SamplingParams, gumbel_top_k, probs_from_logits
from ..runtime.quantized import input_dtype
from ..tree import DraftTree
from ..verifiers.tree_sampling import without_replacement
from .base import DraftContext, DraftFeedback, Drafter
from .draft_vocab import DraftVocab

# 16 nodes, depth 4: wide near the root where heads are most accurate.
DEFAULT_PATHS = ("0;1;2;3;0,0;0,1;0,2;1,0;1,1;2,0;0,0,0;0,0,1;0,1,0;1,0,0;0,0,0,0;0,0,0,1")


def parse_paths(spec) -> list[tuple[int, ...]]:
    """A path list from a string ("0;1;0,0;0,1"; "chain:4" for a chain of 4) or a list of lists, sorted by
    depth then index; every path's parent must be present."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("chain:"):
            n = int(text.split(":", 1)[1])
            paths = [tuple([0] * d) for d in range(1, n + 1)]
        else:
            try:
                paths = [tuple(int(i) for i in part.split(",")) for part in text.replace(" ", "").split(";") if part]
            except ValueError:
                raise ValueError(f"paths must look like '0;1;0,0;0,1' (';' between paths, ',' inside), got {spec!r}")
    else:
        paths = [tuple(int(i) for i in p) for p in spec]
    paths = sorted(set(paths), key=lambda p: (len(p), p))
    known = set(paths)
    for p in paths:
        if not p or min(p) < 0:
            raise ValueError(f"bad path {list(p)}: paths are non-empty lists of candidate indices >= 0")
        if len(p) > 1 and p[:-1] not in known:
            raise ValueError(f"path {list(p)} has no parent path {list(p[:-1])}")
    if not paths:
        raise ValueError("the path list is empty")
    return paths


def grow_tree(paths: list[tuple[int, ...]], child_logits, params: SamplingParams,
              generator: torch.Generator | None) -> DraftTree | None:
    """Fill a path list depth by depth. `child_logits(depth, prefixes)` gets the token prefixes of the parents
    at depth-1 (lists of drafted tokens, [] for the root) and returns logits (P, V) for their children.
    Greedy: a parent's children are its top tokens. Sampling: they are drawn without replacement from the
    drafter's distribution and `draft_probs` holds the sibling conditionals the tree verifier needs."""
    tokens: dict[tuple[int, ...], int] = {}
    probs: dict[tuple[int, ...], torch.Tensor] = {}
    kept: list[tuple[int, ...]] = []
    depth = 0
    while True:
        depth += 1
        level = [p for p in paths if len(p) == depth and (depth == 1 or p[:-1] in tokens)]
        if not level:
            break
        parents = sorted({p[:-1] for p in level})
        wanted = {par: 1 + max(p[-1] for p in level if p[:-1] == par) for par in parents}
        prefixes = [[tokens[par[:j]] for j in range(1, len(par) + 1)] for par in parents]
        logits = child_logits(depth, prefixes).float()  # (P, V)
        for row, par in enumerate(parents):
            m = wanted[par]
            if params.greedy:
                cand = [int(t) for t in torch.topk(logits[row], m).indices.tolist()]
                cond = None
            else:
                q = probs_from_logits(logits[row], params)
                cand = gumbel_top_k(q, m, generator)
                cond = without_replacement(q, cand)
            for j, tok in enumerate(cand):
                tokens[par + (j,)] = tok
                if cond is not None:
                    probs[par + (j,)] = cond[j]
        kept.extend(p for p in level if p in tokens)
    if not kept:
        return None
    kept.sort(key=lambda p: (len(p), p))
    tree = DraftTree.from_paths([list(p) for p in kept], torch.tensor([tokens[p] for p in kept], dtype=torch.long))
    if not params.greedy:  # from_paths keeps the order of an already sorted list
        tree.draft_probs = torch.stack([probs[p] for p in kept]).unsqueeze(0)
    return tree


class ResBlock(nn.Module):
    """x + W_out silu(W_in x); W_out starts at zero so a new block is the identity."""

    def __init__(self, hidden: int):
        super().__init__()
        self.inner = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(nn.functional.silu(self.inner(x)))


class LinearResBlock(nn.Module):
    """x + silu(W x + b), the Medusa paper's block (the layout vLLM loads); W and b start at zero (identity)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


BLOCKS = {"mlp": ResBlock, "linear": LinearResBlock}


class MedusaHeads(nn.Module):
    """K sequentially independent heads: head k maps h_t (..., H) to a state for the frozen LM head.
    `block`: "mlp" (x + W_out silu(W_in x)) or "linear" (the paper's x + silu(W x), which `leapdecode export`
    can write in vLLM's layout)."""

    kind = "medusa"
    conditions_on_tokens = False

    def __init__(self, hidden_size: int, num_heads: int = 4, layers: int = 1, block: str = "mlp"):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"medusa block must be one of {', '.join(BLOCKS)}, got {block!r}")
        self.num_heads = num_heads
        self.block = block
        self.heads = nn.ModuleList(nn.Sequential(*[BLOCKS[block](hidden_size) for _ in range(layers)])
                                   for _ in range(num_heads))

    def head_state(self, k: int, feature: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """State of head k (1-based) from features (P, H); `embeds` is ignored (independent heads)."""
        return self.heads[k - 1](feature)


class FeatureDrafter(Drafter):
    """Common part of drafters that read the target's hidden state at the last verified position.

    The first step of a request proposes nothing (no hidden state yet); its feedback carries the hidden
    state of the last prompt token (the root row), and every later feedback the row of the last accepted node.
    """

    needs_target_hidden = True

    def __init__(self, target, net: nn.Module, paths, max_nodes: int = 64, vocab: torch.Tensor | None = None):
        if max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
        self.net = net
        self.paths = parse_paths(paths)
        self.max_nodes = max_nodes
        model = target.model
        self.lm_head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        # the LM head over a draft vocabulary (see draft_vocab.py), or None for the full head
        self.vocab = DraftVocab(self.lm_head, vocab) if vocab is not None else None
        self.feature: torch.Tensor | None = None  # (H,) hidden state of the last verified position
        self.forward_passes = 0

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.feature = None
        self.forward_passes = 0
        if self.vocab is not None:
            self.vocab.begin(prompt)

    def update(self, feedback: DraftFeedback) -> None:
        if feedback.target_hidden is None:
            self.feature = None
            return
        row = 1 + feedback.accepted_nodes[-1] if feedback.accepted_nodes else 0
        self.feature = feedback.target_hidden[0, row].detach().float()

    def budget_paths(self, ctx: DraftContext) -> list[tuple[int, ...]]:
        return self.paths[: min(self.max_nodes, ctx.max_tokens)]

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        if self.feature is None:
            return None
        paths = self.budget_paths(ctx)
        if not paths:
            return None
        return grow_tree(paths, lambda d, pre: self.child_logits(d, pre, ctx), ctx.params, ctx.generator)

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        if self.vocab is not None:
            return self.vocab.logits(state)
        return self.lm_head(state.to(input_dtype(self.lm_head)))

    def child_logits(self, depth: int, prefixes: list[list[int]], ctx: DraftContext) -> torch.Tensor:
        raise NotImplementedError


class MedusaDrafter(FeatureDrafter):
    def __init__(self, target, net: MedusaHeads, paths=DEFAULT_PATHS, max_nodes: int = 64, vocab=None):
        super().__init__(target, net, paths, max_nodes, vocab)
        self._cache: dict[int, torch.Tensor] = {}

    def budget_paths(self, ctx: DraftContext) -> list[tuple[int, ...]]:
        return [p for p in super().budget_paths(ctx) if len(p) <= self.net.num_heads]

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        self._cache = {}
        return super().propose(ctx)

    def child_logits(self, depth: int, prefixes: list[list[int]], ctx: DraftContext) -> torch.Tensor:
        if depth not in self._cache:  # independent heads: one distribution per depth, whatever the parent
            self._cache[depth] = self.logits(self.net.head_state(depth, self.feature[None]))
            self.forward_passes += 1
        return self._cache[depth].expand(len(prefixes), -1)
