"""A compressed KV cache for transformers models: old tokens in compressed blocks, recent ones exact (a float32
model's in float16 unless `window_dtype` says otherwise: "exact" below means "not quantized").

`CompressedCache` is a transformers `Cache` (one `CompressedLayer` per model layer, created lazily, each keeping
the whole sequence; sliding-window layers get their window from the attention mask, as the project's plain
cache does). What a query at position p sees is a function of p only:

    positions [0, C(p)) come from compressed blocks, [C(p), p) are exact,
    C(p) = block * max(0, (p - window) // block)

so every query sees at least the last `window` tokens exactly (GEAR's streaming buffer), and the cache view
changes only at positions window + k * block. One-token decoding sees exactly this; a pass that feeds several
tokens across such a position is split there by `passes.py` (the CausalLM does it), so speculative decoding on
this cache gives the tokens plain decoding on this cache gives.

A prompt fed alone into the empty cache (`CausalLM.forward(..., prompt=True)`, every method's first pass) is the
exception: all its queries see exact keys, as GEAR's prefill does; the next pass compresses its blocks, all in one
call. Every method feeds the prompt that way, so the rule above holds for every later position.

Reads: on the exact runtime the model's attention reads the blocks itself (`in_attention`): `update` hands it
only the exact part and leaves the layer in `runtime.attention.BLOCK_READS`, and the C++ kernel decodes each
head's blocks into its scratch rows with decompression's float32 operations (the same bits as decompressing
first). Otherwise `update` decompresses the blocks into the tensors it returns, every pass.

The attention sink: the first `sink` tokens (default 1) are kept exact too, as the window is stored. Most heads
put much of their weight on the first token, whose keys and values are unlike the others'; quantized with its
block it both loses more than other tokens and widens its block's key groups. It is left out of the first
block's groups (its rows there are copies of the next token's) and written over the decoded block.

Storage: compressed blocks for [0, C_stored) and an exact buffer for [E, length) with E <= C_stored: a block
compressed while a pass was split keeps its exact copy until the pass is committed (it may still be rolled
back to before the position where the view changed). A commit (the CausalLM's crop or path compaction, through
kv_cache.py) settles the cache: it compresses up to C(length) at once, as the next pass would first, so between
passes the exact part is the window (window to window + block - 1 tokens). Rollback (`crop_to`, `keep`) works
inside the exact buffer; reaching into compressed blocks raises `KVRollbackError`. The window must therefore be
at least the depth of the longest draft (the default 64 is).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import LeapdecodeError
from ..runtime import attention, native
from .codec import SCALE_TABLE, BlockCodec, Blocks


class KVRollbackError(LeapdecodeError):
    """A rollback reached into the compressed part of a compressed KV cache."""


class _View:
    """State shared by a cache and its layers: the position whose view a continued (split) pass must see, and
    whether the model's attention reads the compressed blocks itself (`CompressedLayer.attend`)."""

    def __init__(self, in_attention: bool = False) -> None:
        self.position: int | None = None
        self.in_attention = in_attention


def _block_tensors(blocks: Blocks, sink: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The blocks as the C++ kernel takes them: their fields (empty where absent), then the exact sink rows in
    float32 (empty when none)."""
    rows = torch.empty(0) if sink is None else sink.float().contiguous()
    return [torch.empty(0) if t is None else t for t in blocks._fields()] + [rows]


def _without_sink(x: torch.Tensor, sink: int) -> torch.Tensor:
    """A first block with its sink rows replaced by copies of the next row (so they do not widen its groups)."""
    x = x.clone()
    x[..., :sink, :] = x[..., sink:sink + 1, :]
    return x


class CompressedLayer(DynamicLayer):
    is_croppable = False  # transformers' own crop(): use `crop_to` / `keep`, which check the window

    def __init__(self, key_codec: BlockCodec, value_codec: BlockCodec, window: int, block: int, view: _View,
                 window_dtype: torch.dtype | None = torch.float16, layer_index: int = 0, sink: int = 0):
        super().__init__()
        self.layer_index = layer_index  # the model layer it serves (attention checks it takes its own read)
        self.hidden = 0  # positions the last deferred read left to `attend` (in the blocks)
        self._kernel_args: tuple | None = None  # `attend`'s block tensors and layouts, kept until blocks change
        self.key_codec, self.value_codec = key_codec, value_codec
        self.window, self.block, self._view = window, block, view
        self.window_dtype = window_dtype  # how a float32 model's recent tokens are stored (None: as computed)
        self.key_blocks: Blocks | None = None
        self.value_blocks: Blocks | None = None
        self.sink = sink  # the first positions kept exact (`sinks` once the first block is compressed)
        self.sinks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.exact_start = 0  # E: the absolute position of keys[..., 0, :]

    # ----- sizes -------------------------------------------------------------------------------------------
    @property
    def compressed_length(self) -> int:
        return 0 if self.key_blocks is None else self.key_blocks.count * self.block

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.exact_start + self.keys.shape[-2]

    def view_length(self, position: int) -> int:
        """C(p): how many leading positions a query at `position` sees through compressed blocks."""
        return self.block * max(0, (position - self.window) // self.block)

    @property
    def nbytes(self) -> int:
        total = 0
        for blocks in (self.key_blocks, self.value_blocks):
            if blocks is not None:
                total += blocks.nbytes
        for rows in self.sinks or ():
            total += rows.numel() * rows.element_size()
        if self.is_initialized:
            total += self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return total

    # ----- update --------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = self._stored(key_states[..., :0, :])
        self.values = self._stored(value_states[..., :0, :])
        self.is_initialized = True

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        """The window's copy of new keys or values: a float32 model's in `window_dtype` (float16 saturates at
        its largest finite value), others as they are."""
        if self.window_dtype is None or x.dtype != torch.float32:
            return x
        if self.window_dtype == torch.float16:
            x = x.clamp(-65504.0, 65504.0)
        return x.to(self.window_dtype)

    def _compress_to(self, length: int) -> None:
        """Compress the blocks up to `length` (a multiple of the block), all in one call (after a prompt, many)."""
        if self.compressed_length >= length:
            return
        start = self.compressed_length - self.exact_start
        if start < 0:
            raise KVRollbackError("compressed KV cache: the exact copy of a block to compress is gone")
        stop = start + length - self.compressed_length
        keys, values = self.keys[..., start:stop, :], self.values[..., start:stop, :]
        if self.compressed_length == 0 and self.sink:
            self.sinks = (keys[..., :self.sink, :].clone(), values[..., :self.sink, :].clone())
            keys, values = _without_sink(keys, self.sink), _without_sink(values, self.sink)
        kb = self.key_codec.compress_blocks(keys, self.block)
        vb = self.value_codec.compress_blocks(values, self.block)
        self.key_blocks = kb if self.key_blocks is None else self.key_blocks.cat(kb)
        self.value_blocks = vb if self.value_blocks is None else self.value_blocks.cat(vb)
        self._kernel_args = None

    def settle(self) -> None:
        """Compress and drop now what the next pass would compress and drop first (the same call on the same
        positions, made earlier): the blocks no query from the current length on reads exactly."""
        if self.is_initialized:
            view = self.view_length(self.get_seq_length())
            self._compress_to(view)
            self._trim_to(view)

    def _trim_to(self, length: int) -> None:
        """Drop the exact copy of positions before `length` (they are compressed)."""
        drop = length - self.exact_start
        if drop > 0:
            self.keys = self.keys[..., drop:, :]
            self.values = self.values[..., drop:, :]
            self.exact_start = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        continued = self._view.position is not None  # a later part of a split pass: it may still be rolled back
        view = self.view_length(self._view.position if continued else length)
        if continued:
            self._compress_to(view)
        else:  # a new pass: rollbacks stay at or after `length`, so views stay at or after `view`
            self.settle()
        if view < self.exact_start:
            raise KVRollbackError(f"compressed KV cache: a view of {view} compressed positions needs exact data "
                                  f"from position {view}, kept from {self.exact_start}")
        self.keys = torch.cat([self.keys, self._stored(key_states)], dim=-2)
        self.values = torch.cat([self.values, self._stored(value_states)], dim=-2)
        skip = view - self.exact_start
        if view and self._view.in_attention:  # the attention reads the blocks itself (`attend`)
            self.hidden = view
            attention.BLOCK_READS.put(self.layer_index, self)
            return self.keys[..., skip:, :].to(key_states.dtype), self.values[..., skip:, :].to(value_states.dtype)
        sinks = self.sinks or (None, None)
        return (self._read(self.key_codec, self.key_blocks, sinks[0], self.keys[..., skip:, :], view,
                           key_states.dtype),
                self._read(self.value_codec, self.value_blocks, sinks[1], self.values[..., skip:, :], view,
                           value_states.dtype))

    def _read(self, codec: BlockCodec, blocks: Blocks | None, sink: torch.Tensor | None, exact: torch.Tensor,
              view: int, dtype: torch.dtype) -> torch.Tensor:
        """What attention sees: the first `view` positions decompressed, then the exact part, in one new tensor
        (the blocks are decompressed straight into it, no concatenation). No gradient flows through a cache."""
        if view == 0:
            return exact.to(dtype)
        with torch.no_grad():
            return self._read_into(codec, blocks, sink, exact, view, dtype)

    def _read_into(self, codec: BlockCodec, blocks: Blocks, sink: torch.Tensor | None, exact: torch.Tensor,
                   view: int, dtype: torch.dtype) -> torch.Tensor:
        b, h, _, d = exact.shape
        out = torch.empty(b, h, view + exact.shape[-2], d, dtype=dtype, device=exact.device)
        codec.decompress(blocks, self.block, d, dtype, view // self.block, out=out[..., :view, :])
        if sink is not None:  # written over the decoded first block, as the kernel does
            out[..., :sink.shape[-2], :].copy_(sink)
        out[..., view:, :].copy_(exact)
        return out

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lists, scaling: float) -> torch.Tensor:
        """Attention for the pass whose `update` just ran: positions [0, hidden) from the blocks, decoded inside
        the C++ kernel, the rest from `key`/`value` (runtime/attention.py's `BlockReader`). The same bits as
        decompressing first and running the row-invariant attention on the result."""
        if self._kernel_args is None:  # the blocks as the kernel takes them, until more are compressed
            sinks = self.sinks or (None, None)
            self._kernel_args = (_block_tensors(self.key_blocks, sinks[0]), _block_tensors(self.value_blocks, sinks[1]),
                                 self.key_codec.layout(), self.value_codec.layout())
        keys, values, key_layout, value_layout = self._kernel_args
        return native.kernels().block_attention(query, key, value, self.hidden, self.block, keys, values, key_layout,
                                                value_layout, SCALE_TABLE, lists.start, lists.stop, lists.col_ptr,
                                                lists.columns, scaling)

    # ----- rollback ------------------------------------------------------------------------------------------
    def _check(self, length: int, what: str) -> None:
        if length < self.compressed_length:
            raise KVRollbackError(
                f"compressed KV cache: cannot {what} to position {length}, positions before "
                f"{self.compressed_length} are compressed (the exact window holds the last {self.window}+ tokens; "
                f"drafts must not be deeper than the window: raise kv_window)")

    def crop_to(self, length: int) -> None:
        if not self.is_initialized or length >= self.get_seq_length():
            return
        self._check(length, "roll back")
        self.keys = self.keys[..., :length - self.exact_start, :]
        self.values = self.values[..., :length - self.exact_start, :]

    def keep(self, start: int, positions: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self._check(start, "compact")
        rel = positions.to(self.keys.device) - self.exact_start
        head = start - self.exact_start
        self.keys = torch.cat([self.keys[..., :head, :], self.keys.index_select(-2, rel)], dim=-2)
        self.values = torch.cat([self.values[..., :head, :], self.values.index_select(-2, rel)], dim=-2)

    def crop(self, tokens_to_remove: int) -> None:  # transformers' API: a negative count of tokens to drop
        if tokens_to_remove < 0:
            self.crop_to(self.get_seq_length() + tokens_to_remove)
        elif tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.key_blocks = self.value_blocks = None
        self.sinks = None
        self._kernel_args = None
        self.exact_start = 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a compressed KV cache holds one batch as it was filled")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a compressed KV cache holds one batch as it was filled")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a compressed KV cache does not support beam search")


class CompressedCache(Cache):
    """Keys and values older than the window in compressed blocks ("quant": per-group quantization; "gear":
    quantization + low-rank error + exact outliers). Lossy: the model sees approximate old keys and values."""

    def __init__(self, kind: str, bits: int, rank: int = 0, outliers: float = 0.0, window: int = 64,
                 block: int = 64, group: int = 64, scale_bits: int = 8,
                 window_dtype: torch.dtype | None = torch.float16, in_attention: bool = False, sink: int = 0):
        if kind not in ("quant", "gear"):
            raise ValueError(f"kind must be quant or gear, got {kind!r}")
        if window < 1 or block < 1:
            raise ValueError("window and block must be positive")
        if not 0 <= sink < block:
            raise ValueError("sink must be from 0 to block - 1")
        if kind == "quant":
            rank, outliers = 0, 0.0
        self.kind, self.bits, self.rank, self.outliers = kind, bits, rank, outliers
        self.window, self.block, self.group = window, block, group
        self.scale_bits, self.window_dtype, self.sink = scale_bits, window_dtype, sink
        self._view = _View(in_attention)
        codecs = [BlockCodec(k, bits, group, rank, outliers, scale_bits) for k in ("key", "value")]
        view = self._view
        made = []

        def layer() -> CompressedLayer:  # transformers makes them in layer order
            made.append(CompressedLayer(codecs[0], codecs[1], window, block, view, window_dtype, len(made), sink))
            return made[-1]

        super().__init__(layer_class_to_replicate=layer)

    def __repr__(self) -> str:
        return (f"CompressedCache({self.kind}, bits={self.bits}, rank={self.rank}, outliers={self.outliers}, "
                f"window={self.window}, block={self.block}, sink={self.sink})")

    # the CausalLM's operations (kv_cache.py dispatches here; after a commit it also calls `settle`)
    def crop_to(self, length: int) -> None:
        for layer in self.layers:
            layer.crop_to(length)

    def keep(self, start: int, positions) -> None:
        index = torch.as_tensor(positions, dtype=torch.long)
        for layer in self.layers:
            layer.keep(start, index)

    def settle(self) -> None:
        """After a commit (the cache's positions are its indices again; a split tree pass's internal `keep` is
        not one), between passes: compress the blocks no query from the current length on reads exactly, drop
        their exact copies, so the cache holds the window (window to window + block - 1 exact tokens) and not
        also the blocks the next pass would compress first. Changes when, not what, is compressed."""
        if self._view.position is None:
            for layer in self.layers:
                layer.settle()

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    # pass splitting (passes.py)
    def view_changes(self, start: int, end: int) -> list[int]:
        """The positions p in (start, end) where a query's view differs from the one at p - 1."""
        first = max(start + 1, self.window + self.block)
        offset = (first - self.window) % self.block
        if offset:
            first += self.block - offset
        return list(range(first, end, self.block))

    def view_length(self, position: int) -> int:
        return self.block * max(0, (position - self.window) // self.block)

    def continue_at(self, position: int | None) -> None:
        """Mark the next update as the part of a split pass whose first query is at `position` (None: done)."""
        self._view.position = position
