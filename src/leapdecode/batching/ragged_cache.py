"""The batched KV cache: rows of different lengths, each at its own columns, and the step's scorer over it.

`RaggedCache` is a transformers `DynamicCache` of shape (B, heads, C, head_dim) plus a bool map `valid`
(B, C): which columns hold a committed token of that row. Rows never move during a step: every row's new
tokens are appended at the same columns, rejected draft entries and padding simply stay invalid (a hole) and
are masked out. A token's position is the number of valid columns before it, passed as `position_ids`, so
holes never shift positions. When the widest row wastes more than `compact_slack` columns, or rows join or
leave, the cache is re-packed: each row's valid columns are gathered to the right end (left padding). Masked
holes get exactly zero attention weight, so every row computes what it would alone (up to float summation
order), which the tests check as identical greedy output. Masks come from `masks.attention_masks`, sliding
windows (gemma3) included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .. import kv_cache
from ..masks import attention_masks
from ..tree import DraftTree


def _layers_of(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers
            if getattr(layer, "keys", None) is not None and layer.keys.numel()]


def _left_pad(t: torch.Tensor | None, width: int, rows: int, like: torch.Tensor) -> torch.Tensor:
    """`t` (rows, H, n, D) left-padded with zeros to `width` columns; all zeros (shaped like `like`) if None."""
    if t is None or t.shape[2] == 0:
        return like.new_zeros(rows, like.shape[1], width, like.shape[3])
    if t.shape[2] == width:
        return t
    return torch.cat([t.new_zeros(rows, t.shape[1], width - t.shape[2], t.shape[3]), t], 2)


@dataclass
class StepInputs:
    """One batched target pass over B rows of q query tokens each (root + padded tree)."""

    ids: torch.Tensor  # (B, q) int64
    positions: torch.Tensor  # (B, q) int64
    masks: dict[str, torch.Tensor]  # layer type -> (B, 1, q, C+q) bool


class RaggedCache:
    """A batched KV cache whose rows hold different numbers of committed tokens at their own columns."""

    def __init__(self, sliding_window: int | None = None, compact_slack: int = 16):
        self.sliding_window = sliding_window
        self.compact_slack = compact_slack
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (B, H, C, D); empty until known
        self.valid = torch.zeros(0, 0, dtype=torch.bool)  # (B, C)
        self.cache = DynamicCache()
        self.compactions = 0

    def emptied(self) -> "RaggedCache":
        """A new, empty cache with the same settings."""
        return RaggedCache(self.sliding_window, self.compact_slack)

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def lengths(self) -> torch.Tensor:
        """(B,) committed tokens in each row's cache (= the position of each row's next token)."""
        return self.valid.sum(1)

    # ----- layout changes (between steps) -----
    def _rebuild(self) -> None:
        self.cache = DynamicCache(ddp_cache_data=self.layers) if self.layers and self.width else DynamicCache()

    def _read_back(self) -> None:
        self.layers = _layers_of(self.cache)

    def add_row(self, row: DynamicCache, length: int) -> None:
        """Append one sequence's prefilled cache (1, H, length, D) as the last row, right-aligned.
        All or nothing: the cache is changed only once the merged row is built."""
        row_layers = _layers_of(row) if length else []
        width = max(self.width, length)
        template = self.layers or row_layers
        merged = []
        for i in range(len(template)):
            mine = [_left_pad(t, width, self.rows, template[i][j]) for j, t in
                    enumerate(self.layers[i] if self.layers else (None, None))]
            theirs = [_left_pad(t, width, 1, template[i][j]) for j, t in
                      enumerate(row_layers[i] if row_layers else (None, None))]
            merged.append((torch.cat([mine[0], theirs[0]], 0), torch.cat([mine[1], theirs[1]], 0)))
        valid_row = torch.zeros(1, width, dtype=torch.bool)
        valid_row[0, width - length :] = True
        old = torch.cat([torch.zeros(self.rows, width - self.width, dtype=torch.bool), self.valid], 1)
        self.layers, self.valid = merged, torch.cat([old, valid_row], 0)
        self._rebuild()

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then re-pack."""
        index = torch.tensor(rows, dtype=torch.long)
        self.valid = self.valid[index]
        self.layers = [(k[index.to(k.device)], v[index.to(v.device)]) for k, v in self.layers]
        self.compact()

    def compact(self) -> None:
        """Gather each row's valid columns to the right end; the width becomes the longest row's length."""
        lengths = self.lengths()
        width = int(lengths.max()) if self.rows else 0
        order = torch.argsort((~self.valid).to(torch.int8), dim=1, stable=True)  # valid columns first, in order
        shift = (width - lengths).unsqueeze(1)  # left padding of each row
        cols = torch.arange(width).unsqueeze(0)
        src = torch.gather(order, 1, (cols - shift).clamp_min(0)) if width else order[:, :0]  # (B, width)
        moved = []
        for k, v in (self.layers if width else []):
            moved.append(tuple(torch.gather(t, 2, src.to(t.device)[:, None, :, None].expand(
                -1, t.shape[1], -1, t.shape[3])) for t in (k, v)))
        self.layers = moved
        self.valid = cols >= shift
        self.compactions += 1
        self._rebuild()

    # ----- one step -----
    def step_inputs(self, roots: list[int], trees: list[DraftTree]) -> StepInputs:
        """Inputs for feeding each row's root plus its tree, padded to the largest tree."""
        batch, past = self.rows, self.width
        q = 1 + max(t.size for t in trees)
        lengths = self.lengths()
        ids = torch.zeros(batch, q, dtype=torch.long)
        positions = lengths.unsqueeze(1).repeat(1, q)
        new = torch.eye(q, dtype=torch.bool).unsqueeze(0).repeat(batch, 1, 1)  # padding attends to itself only
        for b, tree in enumerate(trees):
            n = tree.size + 1
            ids[b, 0] = roots[b]
            ids[b, 1:n] = tree.tokens[0]
            layout = tree.layout
            positions[b, :n] += layout.depths
            new[b, :n, :n] = layout.ancestor_mask
        masks = attention_masks(self.valid, new, positions, self.sliding_window)
        return StepInputs(ids=ids, positions=positions, masks=masks)

    def commit(self, kept: list[list[int]], q: int) -> None:
        """After a pass of q columns per row: row b keeps its root and its accepted nodes `kept[b]`."""
        new_valid = torch.zeros(self.rows, q, dtype=torch.bool)
        for b, nodes in enumerate(kept):
            new_valid[b, 0] = True
            if nodes:
                new_valid[b, torch.tensor(nodes) + 1] = True
        self.valid = torch.cat([self.valid, new_valid], 1)
        used = self.valid.any(0).nonzero()
        end = int(used[-1]) + 1 if used.numel() else 0
        if end < self.width:  # nobody kept the last columns: crop them (views, no copy)
            self.valid = self.valid[:, :end]
            kv_cache.crop(self.cache, end)
        self._read_back()
        if self.width - int(self.lengths().max()) > self.compact_slack:
            self.compact()


class RaggedScorer:
    """The `step.Scorer` of a batch: one forward pass of the target over every row's root and padded tree."""

    prompt_pending = False  # rows join prefilled

    def __init__(self, model: torch.nn.Module, cache: RaggedCache, device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self.width = 0  # query columns of the last pass

    def score(self, roots: list[int], trees: list[DraftTree], hidden: list[int | None]):
        inputs = self.cache.step_inputs(roots, trees)
        wanted = {h for h in hidden if h is not None}
        masks = {k: m.to(self.device) for k, m in inputs.masks.items()}
        out = self.model(
            input_ids=inputs.ids.to(self.device), position_ids=inputs.positions.to(self.device),
            attention_mask=masks if self.cache.sliding_window is not None else masks["full_attention"],
            cache=self.cache.cache, use_cache=True, **({"output_hidden_states": True} if wanted else {}),
        )
        self.width = inputs.ids.shape[1]
        # logits (B, q, V); hidden states (B, q, H): each row's `hidden[b]` entry of the model's hidden states
        # (-1: the final norm's outputs, like lm.CausalLM's)
        if not wanted:
            return out.logits, None
        if len(wanted) == 1:
            return out.logits, out.hidden_states[wanted.pop()]
        return out.logits, torch.stack([out.hidden_states[-1 if h is None else h][b] for b, h in enumerate(hidden)])

    def commit(self, accepted: list[list[int]]) -> None:
        self.cache.commit(accepted, self.width)
