"""A KV cache that appends in place: transformers' `DynamicCache` with layers that grow a buffer by doubling.

transformers' `DynamicLayer` appends by `torch.cat`, which copies the whole cache of every layer on every pass
(23 MB per token for SmolLM2-135M after 500 tokens). `GrowingLayer` keeps each layer's keys and values in a
buffer with spare room: appending writes only the new columns, cropping only moves the end, and the `keys` /
`values` it hands out are views of the buffer's first `length` columns. Assigning `layer.keys = t` (as
transformers' own layer code, `kv_cache.crop/keep` and the batch engine's ragged cache do) keeps working: a
prefix view of the buffer only moves the end, anything else is copied into the buffer.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

_MIN_CAPACITY = 256


class _Buffer:
    """One tensor (batch, heads, capacity, dim) of which the first `length` columns are in use."""

    def __init__(self):
        self.data: torch.Tensor | None = None
        self.length = 0

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data.narrow(-2, 0, self.length)

    def _reserve(self, like: torch.Tensor, needed: int) -> None:
        data = self.data
        fits = (data is not None and data.dtype == like.dtype and data.device == like.device
                and data.shape[:-2] == like.shape[:-2] and data.shape[-1] == like.shape[-1])
        if fits and data.shape[-2] >= needed:
            return
        capacity = max(_MIN_CAPACITY, 2 * needed)
        fresh = like.new_empty(*like.shape[:-2], capacity, like.shape[-1])
        if fits and self.length:
            fresh[..., :self.length, :] = data[..., :self.length, :]
        else:
            self.length = 0
        self.data = fresh

    def assign(self, t: torch.Tensor | None) -> None:
        if t is None or t.dim() < 3:  # None, or transformers' empty placeholder before the first update
            self.data, self.length = None, 0
            return
        data = self.data
        if (data is not None and t.data_ptr() == data.data_ptr() and t.stride() == data.stride()
                and t.shape[:-2] == data.shape[:-2] and t.shape[-1] == data.shape[-1]
                and t.shape[-2] <= data.shape[-2]):
            self.length = t.shape[-2]  # a prefix view of the buffer: crop
            return
        if data is not None and t.untyped_storage().data_ptr() == data.untyped_storage().data_ptr():
            t = t.clone()  # another view of the buffer: copy it out before writing over it
        self.length = 0
        self._reserve(t, t.shape[-2])
        self.data[..., :t.shape[-2], :] = t
        self.length = t.shape[-2]

    def append(self, new: torch.Tensor) -> torch.Tensor:
        added = new.shape[-2]
        end = self.length + added
        self._reserve(new, end)
        self.data.narrow(-2, self.length, added).copy_(new)
        self.length = end
        return self.data.narrow(-2, 0, end)


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose appends write in place into a buffer with spare room."""

    def __init__(self, *args, **kwargs):
        self._k, self._v = _Buffer(), _Buffer()
        super().__init__(*args, **kwargs)

    @property
    def keys(self):
        return self._k.view()

    @keys.setter
    def keys(self, t):
        self._k.assign(t)

    @property
    def values(self):
        return self._v.view()

    @values.setter
    def values(self, t):
        self._v.assign(t)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.append(key_states, value_states)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write the new entries after the ones held (the layer is initialized); returns the whole views."""
        return self._k.append(key_states), self._v.append(value_states)

    def get_seq_length(self) -> int:
        return self._k.length if self.is_initialized else 0


class GrowingCache(DynamicCache):
    """`DynamicCache` made of `GrowingLayer`s (one per decoder layer, created on first use)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """`update` for a layer that already holds entries, without transformers' per-call bookkeeping (the
        compiled passes' attention op calls it once per layer and pass); otherwise `update` itself."""
        if layer_idx < len(self.layers):
            layer = self.layers[layer_idx]
            if layer.is_initialized:
                return layer.append(key_states, value_states)
        return self.update(key_states, value_states, layer_idx)
