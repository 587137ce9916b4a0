"""A causal LM with its own KV cache: feed a chain or score a whole draft tree in one forward pass.

Everything goes through the model's public inputs: `input_ids`, `position_ids`, a 4-D attention mask
(a dict of masks for models with sliding-window layers) and the cache object. Nothing is patched.
"""
from __future__ import annotations

import torch

from . import kv_cache
from .masks import attention_masks
from .runtime import compiled
from .runtime.attention import PROMPT_PASS
from .tree import DraftTree


class CausalLM:
    """One sequence batch decoding with one model; owns the cache (batch, heads, seq, head_dim)."""

    def __init__(self, model: torch.nn.Module, cache_factory=None):
        self.model = model
        # the forward passes: the model itself, or its compiled passes (runtime/compiled.py) when enabled
        self.passes = compiled.passes_for(model) or model
        self.cache_factory = cache_factory or kv_cache.new_cache  # kv_compress.make_cache_factory: compressed
        self.cache = self.cache_factory()
        if self.passes is not model and kv_cache.splits_passes(self.cache):
            raise compiled.CompilationError("compiled passes run on the plain KV cache; use --kv-cache none "
                                            "or run without --compile")
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        types = getattr(cfg, "layer_types", None) or []
        self.sliding_window = getattr(cfg, "sliding_window", None) if "sliding_attention" in types else None
        self.layer_type_names = sorted(set(types))
        self.device = next(model.parameters()).device
        self.forward_passes = 0
        # Drafters that read the target's features (medusa, hydra, falcon) set `keep_hidden`; each pass then
        # asks for `output_hidden_states` and keeps the last entry in `last_hidden` (B, T, H). In transformers
        # 5.x that entry is the output of the final norm (lm_head(last_hidden) == logits; tested in
        # tests/test_trained_drafters.py), i.e. the features Medusa's heads read.
        self.keep_hidden = False
        self.hidden_layer = -1  # which hidden states `last_hidden` keeps (a drafter's `target_hidden_layer`)
        self.last_hidden: torch.Tensor | None = None

    def reset(self) -> None:
        self.cache = self.cache_factory()
        self.forward_passes = 0

    @property
    def length(self) -> int:
        return kv_cache.cache_length(self.cache)

    def forward(self, ids: torch.Tensor, logits_to_keep: int = 0, prompt: bool = False) -> torch.Tensor:
        """Append `ids` (B, T) after the cache, causally; return logits (B, T or logits_to_keep, V).
        `prompt`: `ids` is a prompt fed alone into the empty cache (the exact runtime may use a fused kernel; a
        compressed cache keeps it exact, compressing it from the next pass on, as GEAR compresses after prefill)."""
        first = prompt and self.length == 0
        if kv_cache.splits_passes(self.cache) and not first:  # a compressed cache: one call per view it gives
            logits = kv_cache.split_passes().forward(self, ids, logits_to_keep)
            if logits is not None:
                return logits
        out = self.passes(
            input_ids=ids.to(self.device), cache=self.cache, use_cache=True, logits_to_keep=logits_to_keep,
            **self._hidden_kwargs(), **({PROMPT_PASS: True} if first else {}),
        )
        self._keep(out)
        self.forward_passes += 1
        return out.logits

    def forward_hidden(self, ids: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """Like `forward`, but stop before the LM head: the final (post-norm) hidden states of the last
        `keep` positions (B, keep, H), for callers that apply their own head (a draft vocabulary)."""
        if kv_cache.splits_passes(self.cache):
            hidden = kv_cache.split_passes().forward(self, ids, hidden_only=keep)
            if hidden is not None:
                return hidden
        out = self.passes.get_decoder()(input_ids=ids.to(self.device), cache=self.cache, use_cache=True)
        self.forward_passes += 1
        return out.last_hidden_state[:, -keep:]

    def _hidden_kwargs(self) -> dict:
        return {"output_hidden_states": True} if self.keep_hidden else {}

    def _keep(self, out) -> None:
        if not self.keep_hidden:
            self.last_hidden = None
            return
        hidden = out.hidden_states[self.hidden_layer]
        self.last_hidden = hidden[:, -out.logits.shape[1]:]  # the rows that have logits

    def score_tree(self, root: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        """Feed the root token (B, 1) plus every tree node in one pass; return logits (B, N+1, V).
        With `keep_hidden`, `last_hidden` holds the matching final hidden states (B, N+1, H).

        Row 0 is the distribution after the root, row i+1 the distribution after node i's path.
        `root` may also be (B, P): P-1 uncached tokens fed causally before the root (the prompt, so the
        prefill shares the first verification pass); rows stay those of the root and the nodes.
        A chain takes the plain causal path (no mask needed); other trees use the ancestor mask.
        """
        ids = torch.cat([root, tree.tokens], dim=1)
        layout = tree.layout
        if layout.is_chain:
            return self.forward(ids, logits_to_keep=tree.size + 1)
        past, lead = self.length, root.shape[1] - 1
        ancestors, depths = layout.ancestor_mask, layout.depths
        if lead:  # the lead tokens: causal among themselves, seen by the root and every node
            q = lead + ancestors.shape[0]
            full = torch.zeros(q, q, dtype=torch.bool)
            full[:lead, :lead] = torch.ones(lead, lead, dtype=torch.bool).tril()
            full[lead:, :lead] = True
            full[lead:, lead:] = ancestors
            ancestors, depths = full, torch.cat([torch.arange(lead), lead + depths])
        if kv_cache.splits_passes(self.cache):
            logits = kv_cache.split_passes().score_tree(self, ids, ancestors, depths, past, tree.size + 1)
            if logits is not None:
                return logits
        positions = (past + depths).unsqueeze(0).expand(ids.shape[0], -1)
        mask = self._tree_mask(ancestors, past, positions[0], ids.shape[0])
        out = self.passes(
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=tree.size + 1,
            **self._hidden_kwargs(),
        )
        self._keep(out)
        self.forward_passes += 1
        return out.logits

    def _tree_mask(self, ancestors: torch.Tensor, past: int, positions: torch.Tensor, batch: int):
        """The 4-D mask(s) of a tree pass after `past` cached tokens (see masks.py), expanded to the batch."""
        masks = attention_masks(torch.ones(1, past, dtype=torch.bool), ancestors.unsqueeze(0),
                                positions.unsqueeze(0), self.sliding_window)
        expanded = {k: m.to(self.device).expand(batch, 1, -1, -1) for k, m in masks.items()}
        if self.sliding_window is None:
            return expanded["full_attention"]
        return expanded

    def crop(self, length: int) -> None:
        kv_cache.crop(self.cache, length)

    def keep_path(self, start: int, nodes: list[int]) -> None:
        """After a tree pass fed at cache position `start` (root at `start`), keep the root and `nodes`."""
        if nodes == list(range(len(nodes))):  # a prefix of the node order: a plain crop
            kv_cache.crop(self.cache, start + 1 + len(nodes))
        else:
            kv_cache.keep(self.cache, start + 1, [start + 1 + n for n in nodes])
