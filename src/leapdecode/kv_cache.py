"""KV-cache operations the engine needs after verification: crop a chain, keep a tree path.

Works on transformers' `DynamicCache` through its layers' public `keys`/`values` tensors
(batch, heads, seq, head_dim); the cache is created without a config so every layer keeps the whole
sequence (sliding-window models get their window from the attention mask instead), which keeps crop
and compaction exact for every layer type.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from .runtime.cache import GrowingCache


def new_cache() -> DynamicCache:
    """An empty cache whose layers append in place (runtime/cache.py), not by concatenation."""
    return GrowingCache()


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def splits_passes(cache) -> bool:
    """Whether `cache` is a compressed cache (kv_compress), whose passes are cut where its view changes."""
    return hasattr(cache, "view_changes")


def split_passes():
    from .kv_compress import passes

    return passes


def crop(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of every layer. A commit: a compressed cache then compresses what no
    later query reads exactly (`settle`)."""
    if hasattr(cache, "crop_to"):  # a compressed cache: rollback inside its exact window, then settle
        cache.crop_to(length)
        return cache.settle()
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel() and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def keep(cache: DynamicCache, start: int, positions: torch.Tensor | list[int]) -> None:
    """Compaction: keep positions [0, start) plus `positions` (absolute indices >= start, ascending);
    everything after is dropped. Used to keep a tree's accepted path."""
    if hasattr(cache, "crop_to"):
        cache.keep(start, positions)
        return cache.settle()
    index = torch.as_tensor(positions, dtype=torch.long)
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or not layer.keys.numel():
            continue
        idx = index.to(layer.keys.device)
        layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys.index_select(-2, idx)], dim=-2)
        layer.values = torch.cat([layer.values[..., :start, :], layer.values.index_select(-2, idx)], dim=-2)
