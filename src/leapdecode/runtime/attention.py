"""Row-invariant attention: a token's attention output does not depend on the other rows of the pass.

Registered with transformers' public `AttentionInterface` under the name `EXACT_ATTENTION` (and the stock SDPA
mask builder under the same name in `AttentionMaskInterface`), selected with `model.set_attn_implementation`.

Fused attention kernels split their work by the shape of the whole call (how many query rows, how many keys,
which of them are masked), so the same token scored alone, as the k-th token of a chain, as a tree node or as one
row of a ragged batch gets logits that differ in the last bits; after bf16 rounding that can flip an argmax and
make "speculative output equals plain output" fail. Here every query row is computed by a routine whose
operations depend only on that row's visible keys, in cache order:

```
row (b, i) ──► visible keys of row i (from the mask, or causal when there is none), built once per pass
           ──► C++ kernel (kernels/row_attention.cpp, native.py): every row in one call, a fixed sequence of
               float32 operations per row (explicit fmas, sums in 16 lanes added by a fixed tree), the keys all
               rows share (the cache before the pass) read once for all of them, split between threads by
               (sequence, key/value head)
           ──► or, where no C++ compiler is available, the Python routine: per row, the call a one-token step
               makes, softmax(q k^T * scale) v with q (Hkv, G, D) against exactly its keys (slower)
```
One process uses one of the two for every pass (`native.kernels()` decides once), so a token's output is bitwise
equal alone, in a chain, as a tree node or as a batch row (tests/runtime/test_invariance.py, test_native.py).
The one exception is a prompt fed alone into an empty cache (`PROMPT_PASS`), which every sequence gets the same
way: it takes transformers' fused SDPA.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from . import native
from .cache import GrowingCache

EXACT_ATTENTION = "leapdecode_exact"
# Keyword a caller passes to the model's forward for a prompt fed into an empty cache (`CausalLM.forward`'s
# `prompt=True`): every sequence's prompt is fed that way, alone, so its rows need no invariance and take the
# fused kernel (transformers hands the keyword down to the attention function).
PROMPT_PASS = "leapdecode_prompt"


@dataclass(frozen=True)
class RowKeys:
    """The keys row (batch, query) attends to: a contiguous range [start, stop) or gathered columns."""

    batch: int
    query: int
    start: int
    stop: int
    columns: torch.Tensor | None = None  # (n,) long, set when the visible keys are not contiguous


@dataclass(frozen=True)
class KeyLists:
    """Every row's visible keys as the C++ kernel takes them (row r = batch * q + query): the range
    [start[r], stop[r]), or, when `col_ptr` is not empty, columns[col_ptr[r]:col_ptr[r + 1]]."""

    start: torch.Tensor
    stop: torch.Tensor
    col_ptr: torch.Tensor
    columns: torch.Tensor


_NONE = torch.empty(0, dtype=torch.long)


def key_lists(mask: torch.Tensor | None, batch: int, q: int, kv: int) -> KeyLists:
    if mask is None:  # causal, the queries being the last q keys
        stop = torch.arange(kv - q + 1, kv + 1).repeat(batch)
        return KeyLists(torch.zeros_like(stop), stop, _NONE, _NONE)
    visible = mask if mask.dtype == torch.bool else mask == 0
    visible = visible[:, 0].expand(batch, q, kv).reshape(batch * q, kv).cpu()
    counts = visible.sum(-1)
    col_ptr = torch.zeros(batch * q + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=col_ptr[1:])
    columns = visible.nonzero()[:, 1].contiguous()  # row-major: each row's columns in cache order
    return KeyLists(torch.zeros_like(counts), counts, col_ptr, columns)


class _PlanCache:
    """The last plan built, keyed by the mask tensor it came from (one pass reuses it in every layer)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.shape: tuple = ()
        self.plan = None

    def get(self, mask: torch.Tensor | None, batch: int, q: int, kv: int, build):
        shape = (batch, q, kv)
        if self.plan is not None and self.shape == shape and self.mask is mask:
            return self.plan
        self.plan = build(mask, batch, q, kv)
        self.mask, self.shape = mask, shape
        return self.plan


def _plan(mask: torch.Tensor | None, batch: int, q: int, kv: int) -> list[RowKeys]:
    if mask is None:  # causal, the queries being the last q keys
        return [RowKeys(b, i, 0, kv - q + i + 1) for b in range(batch) for i in range(q)]
    visible = mask if mask.dtype == torch.bool else mask == 0
    visible = visible[:, 0].expand(batch, q, kv).cpu()
    plan = []
    for b in range(batch):
        for i in range(q):
            cols = visible[b, i].nonzero().flatten()
            if cols.numel() == 0:
                plan.append(RowKeys(b, i, 0, 0))
                continue
            start, stop = int(cols[0]), int(cols[-1]) + 1
            contiguous = stop - start == cols.numel()
            plan.append(RowKeys(b, i, start, stop, None if contiguous else cols.to(mask.device)))
    return plan


_PLANS = threading.local()  # per thread: {layer kind: _PlanCache}


class BlockReader(Protocol):
    """A KV cache layer that keeps its oldest `hidden` positions in compressed blocks (kv_compress) and lets the
    attention read them itself: its `update` hands out only the positions after them (`key`, `value` below)
    and leaves itself in `BLOCK_READS` for the attention call that follows."""

    hidden: int

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lists: "KeyLists",
               scaling: float) -> torch.Tensor: ...


class _BlockReads(threading.local):
    """The block reader a layer's cache update left for the attention call that follows it (same thread)."""

    pending: tuple[int, BlockReader] | None = None

    def put(self, layer: int, reader: BlockReader) -> None:
        self.pending = (layer, reader)

    def take(self, module: torch.nn.Module | None) -> BlockReader | None:
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        if module is None or pending[0] != module.layer_idx:
            raise RuntimeError("a compressed KV cache's read was not taken by its own layer's attention")
        return pending[1]


BLOCK_READS = _BlockReads()


def reads_blocks(model: torch.nn.Module) -> bool:
    """Whether attention in `model` can read a compressed cache's blocks itself (the exact attention with the C++
    kernels, float32 on the CPU); otherwise the cache decompresses them for the attention function."""
    param = next(model.parameters())
    return (model.config._attn_implementation == EXACT_ATTENTION and param.device.type == "cpu"
            and param.dtype == torch.float32 and native.kernels() is not None)


def exact_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, q, D), key/value (B, Hkv, kv, D), mask (B, 1, q, kv) bool/additive or None (causal).
    Returns (B, q, H, D) like transformers' other attention functions."""
    if kwargs.get("softcap") is not None:
        raise ValueError("the exact attention does not support attention logit soft-capping")
    if torch.compiler.is_compiling():  # a compiled pass: the cache and this routine run in one opaque op
        return attend(module, query, key, value, scaling), None
    reader = BLOCK_READS.take(module)
    batch, heads, q, dim = query.shape
    kv_heads, kv = key.shape[1], key.shape[2] + (reader.hidden if reader is not None else 0)
    if kwargs.pop(PROMPT_PASS, False) and attention_mask is None and q == kv:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    group = heads // kv_heads
    layer_kind = "sliding" if kwargs.get("sliding_window") else "full"
    kernels = native.kernels() if query.device.type == "cpu" and query.dtype == torch.float32 else None
    if kernels is not None:
        caches = _PLANS.__dict__.setdefault("native", {})
        lists = caches.setdefault(layer_kind, _PlanCache()).get(attention_mask, batch, q, kv, key_lists)
        scale = scaling if scaling is not None else dim ** -0.5
        if reader is not None:
            return reader.attend(query, key, value, lists, float(scale)), None
        return kernels.row_attention(query, key, value, lists.start, lists.stop, lists.col_ptr, lists.columns,
                                     float(scale)), None
    if reader is not None:
        raise RuntimeError("a compressed KV cache left its blocks to an attention without the C++ kernels")
    caches = _PLANS.__dict__.setdefault("by_kind", {})
    plan = caches.setdefault(layer_kind, _PlanCache()).get(attention_mask, batch, q, kv, _plan)
    if batch == 1 and q == 1 and plan[0].columns is None and plan[0].start == 0 and plan[0].stop == kv:
        # a one-token decoding step over the whole cache: the same call as below, without the bookkeeping
        row = _one_row(query[0, :, 0].reshape(kv_heads, group, dim), key[0], value[0], scaling)
        return row.reshape(1, 1, heads, -1), None
    out = query.new_zeros(batch, q, heads, value.shape[-1])
    for row in plan:
        if row.stop == row.start:
            continue
        b = row.batch
        if row.columns is None:
            k = key[b:b + 1, :, row.start:row.stop]
            v = value[b:b + 1, :, row.start:row.stop]
        else:
            k = key[b:b + 1].index_select(2, row.columns)
            v = value[b:b + 1].index_select(2, row.columns)
        qr = query[b, :, row.query].reshape(kv_heads, group, dim)
        out[b, row.query] = _one_row(qr, k[0], v[0], scaling).reshape(heads, -1)
    return out, None


def _one_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """q (Hkv, G, D) against k, v (Hkv, n, D): three ops whose shapes depend only on n, so a row's result is the
    same in every pass (cheaper than a fused kernel's set-up for a few query rows)."""
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.baddbmm(q.new_empty(()).expand(q.shape[0], q.shape[1], k.shape[1]), q, k.transpose(1, 2),
                           beta=0.0, alpha=scale)
    return torch.bmm(scores.softmax(-1), v)


# ----- inside compiled graphs (runtime/compiled.py) ------------------------------------------------------

_ATTENTION_OP = "leapdecode::cached_attention"


class _PassContext(threading.local):
    """The cache and tree mask of the compiled pass in flight (read by the attention op), and its rows' key
    lists for the C++ kernel (the same in every layer, built once per pass by `begin_pass`)."""

    cache = None
    mask: torch.Tensor | None = None
    lists: KeyLists | None = None

    def begin_pass(self, cache, mask: torch.Tensor | None, batch: int, width: int, past: int) -> None:
        self.cache, self.mask = cache, mask
        self.lists = key_lists(mask, batch, width, past + width) if native.kernels() is not None else None

    def end_pass(self) -> None:
        self.cache = self.mask = self.lists = None


PASS_CONTEXT = _PassContext()


def cached_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
                     scaling: float) -> torch.Tensor:
    """query (B, H, q, D), the pass's new key/value rows (B, Hkv, q, D): append them to the context's cache
    at decoder layer `layer`, then attend over the whole cache; returns (B, q, H, D)."""
    cache = PASS_CONTEXT.cache
    if isinstance(cache, GrowingCache):  # the runtime's own cache: the append without transformers' bookkeeping
        keys, values = cache.append(key, value, layer)
    else:
        keys, values = cache.update(key, value, layer)
    lists = PASS_CONTEXT.lists
    if lists is not None and query.dtype == torch.float32 and query.device.type == "cpu":
        return native.kernels().row_attention(query, keys, values, lists.start, lists.stop, lists.col_ptr,
                                              lists.columns, scaling)
    out, _ = exact_attention(None, query, keys, values, PASS_CONTEXT.mask, scaling=scaling)
    return out.contiguous()


def _cached_attention_shape(query, key, value, layer, scaling):
    batch, heads, q, _ = query.shape
    return query.new_empty(batch, q, heads, value.shape[-1])


# Defined with torch.library's plain `Library` rather than the `custom_op` decorator, whose Python wrapper (alias
# checks on every call) cost about 15 us a call, 30 calls a pass.
_LIBRARY = torch.library.Library("leapdecode", "DEF")
_LIBRARY.define("cached_attention(Tensor query, Tensor key, Tensor value, int layer, float scaling) -> Tensor")
_LIBRARY.impl("cached_attention", cached_attention, "CompositeExplicitAutograd")
torch.library.register_fake(_ATTENTION_OP, _cached_attention_shape, lib=_LIBRARY)


def attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           scaling: float | None) -> torch.Tensor:
    """What `attention.exact_attention` does while a graph is being compiled: one opaque attention op."""
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    return torch.ops.leapdecode.cached_attention(query, key, value, int(module.layer_idx), scale)


def register() -> str:
    """Register the exact attention (idempotent); returns the name to pass to `set_attn_implementation`.
    Builds (or loads) the C++ kernel now, while the model loads, rather than in the first pass."""
    native.kernels()
    AttentionInterface.register(EXACT_ATTENTION, exact_attention)
    AttentionMaskInterface.register(EXACT_ATTENTION, sdpa_mask)
    return EXACT_ATTENTION
