"""KV-cache compression (lossy): old keys and values in compressed blocks, recent tokens exact.

- `quant`: per-group asymmetric quantization to 2, 4 or 8 bits (keys per channel, values per token), the
  baseline;
- `gear`: GEAR (Kang et al., 2024): the same quantization, plus a rank-`rank` approximation of each block's
  quantization error per head (power iteration, as the paper computes it), plus a fraction `outliers` of the
  entries kept apart in float16.

The window of recent tokens is not quantized (a float32 model's is stored in float16, `window_dtype`), nor are
the first `sink` tokens (the attention sink: most heads put much of their weight there); a prompt
fed alone is computed exactly and compressed afterwards; on the exact runtime the attention kernel reads the
blocks itself instead of a decompressed copy (cache.py).

Every method runs on it (`Decoder(target, method, kv_cache="gear", kv_bits=4)`, `--kv-cache gear --kv-bits 4`):
the last `window`+ tokens stay exact, so speculative rollbacks touch only exact data, and passes are cut where
the cache's view changes (passes.py), so a lossless method on a compressed cache gives the tokens `ar` gives on
that same cache. Compared with the uncompressed cache the output may differ: the compression is lossy.
`hf-quanto` (transformers' `QuantizedCache`, optimum-quanto backend; optional) is a peer for the perplexity
command only (it cannot roll back).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch

from ..errors import InvalidSettingError
from ..runtime import attention
from .cache import CompressedCache, CompressedLayer, KVRollbackError
from .codec import BlockCodec, Blocks

__all__ = ["KVSettings", "CompressedCache", "CompressedLayer", "KVRollbackError", "BlockCodec", "Blocks",
           "make_cache", "make_cache_factory", "take_settings", "kv_bytes", "KINDS", "ENGINE_KINDS"]

ENGINE_KINDS = ("none", "quant", "gear")  # usable by every decoding method
KINDS = ENGINE_KINDS + ("hf-quanto",)  # hf-quanto: perplexity only

# option names, as Decoder keywords / method options (kv_cache=..., kv_bits=...)
OPTIONS = {"kv_cache": "kind", "kv_bits": "bits", "kv_rank": "rank", "kv_outliers": "outliers",
           "kv_window": "window", "kv_block": "block", "kv_group": "group", "kv_scale_bits": "scale_bits",
           "kv_window_dtype": "window_dtype", "kv_sink": "sink"}
WINDOW_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "model": None}


# per bit width, measured on SmolLM2-135M (README): at 4 bits a few outliers buy more per byte than a low-rank
# term; at 2 bits small groups, outliers and a rank-2 error term are all needed (3% outliers beat rank 3)
BIT_DEFAULTS = {2: {"rank": 2, "outliers": 0.03, "group": 16}, 4: {"rank": 0, "outliers": 0.005, "group": 64},
                8: {"rank": 0, "outliers": 0.0, "group": 64}}


@dataclass(frozen=True)
class KVSettings:
    """What KV cache a model runs on. `window`: tokens always seen exactly (at least the longest draft);
    `block`: tokens compressed together; `group`: value channels per quantization group; `scale_bits`: 8 (scale
    and zero point as one byte each, relative to float16 figures per head and block) or 16 (float16);
    `window_dtype`: how a float32 model's window is stored (float16, bfloat16, or model: float32); `sink`: the
    first tokens kept exact (stored as the window is) and left out of the first block's quantization groups."""

    kind: str = "none"
    bits: int = 4
    rank: int | None = None  # None: by bits (BIT_DEFAULTS)
    outliers: float | None = None
    window: int = 64
    block: int = 64
    group: int | None = None
    scale_bits: int = 8
    window_dtype: str = "float16"
    sink: int = 1

    def __post_init__(self) -> None:
        defaulted = [n for n in ("rank", "outliers", "group") if getattr(self, n) is None]
        for name in defaulted:
            object.__setattr__(self, name, BIT_DEFAULTS.get(self.bits, BIT_DEFAULTS[4])[name])
        object.__setattr__(self, "_defaulted", tuple(defaulted))
        if self.kind not in KINDS:
            raise InvalidSettingError(f"kv_cache must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.bits not in (2, 4, 8):
            raise InvalidSettingError(f"kv_bits must be 2, 4 or 8, got {self.bits!r}")
        if not isinstance(self.rank, int) or self.rank < 0:
            raise InvalidSettingError(f"kv_rank must be a non-negative integer, got {self.rank!r}")
        if not 0.0 <= float(self.outliers) < 0.5:
            raise InvalidSettingError(f"kv_outliers must be a fraction in [0, 0.5), got {self.outliers!r}")
        for name in ("window", "block", "group"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidSettingError(f"kv_{name} must be a positive integer, got {value!r}")
        if self.scale_bits not in (8, 16):
            raise InvalidSettingError(f"kv_scale_bits must be 8 or 16, got {self.scale_bits!r}")
        if self.window_dtype not in WINDOW_DTYPES:
            raise InvalidSettingError(f"kv_window_dtype must be one of {', '.join(WINDOW_DTYPES)}, "
                                      f"got {self.window_dtype!r}")
        if not isinstance(self.sink, int) or not 0 <= self.sink < self.block:
            raise InvalidSettingError(f"kv_sink must be an integer from 0 to kv_block - 1 ({self.block - 1}), "
                                      f"got {self.sink!r}")
        if self.block % (8 // self.bits):
            raise InvalidSettingError(f"kv_block must be a multiple of {8 // self.bits} at {self.bits} bits")

    def with_kind(self, kind: str, bits: int) -> "KVSettings":
        """These settings for another kind and bit width; rank, outliers and group left to their defaults stay
        defaults (of the new bit width)."""
        return replace(self, kind=kind, bits=bits, **{n: None for n in self._defaulted})

    @property
    def lossless(self) -> bool:
        return self.kind == "none"

    @property
    def label(self) -> str:
        """A short name for tables: none, quant-4 (g64, sink1), gear-4 (g64, r0, s0.005, sink1), ..."""
        if self.kind == "none":
            return "none"
        if self.kind == "gear":
            return f"gear-{self.bits} (g{self.group}, r{self.rank}, s{self.outliers:g}, sink{self.sink})"
        if self.kind == "hf-quanto":
            return f"hf-quanto-{self.bits} (g{self.group})"
        return f"{self.kind}-{self.bits} (g{self.group}, sink{self.sink})"


def take_settings(options: dict) -> KVSettings | None:
    """Pop the kv_* keys out of a method-options dict; None when they ask for no compression."""
    given = {OPTIONS[k]: options.pop(k) for k in list(options) if k in OPTIONS}
    kind = given.get("kind") or "none"
    if kind == "none":
        extra = sorted(k for k in given if k != "kind")
        if extra:
            raise InvalidSettingError(f"kv_{extra[0]} is an option of a compressed KV cache: give kv_cache=quant|gear")
        return None
    settings = KVSettings(**given)
    if settings.kind not in ENGINE_KINDS:
        raise InvalidSettingError(f"kv_cache={settings.kind} is for `leapdecode perplexity` only (it cannot roll "
                                  f"back a draft); decoding takes {', '.join(ENGINE_KINDS)}")
    return settings


def make_cache(settings: KVSettings | None = None, config=None, in_attention: bool = False):
    """A fresh cache for one sequence: transformers' `DynamicCache` for none, `CompressedCache` for quant/gear,
    transformers' `QuantizedCache` (quanto backend, needs `config` and optimum-quanto) for hf-quanto.
    `in_attention`: the model's attention reads compressed blocks itself (`runtime.attention.reads_blocks`)."""
    from transformers import DynamicCache

    if settings is None or settings.kind == "none":
        return DynamicCache()
    if settings.kind == "hf-quanto":
        from transformers import QuantizedCache

        if config is None:
            raise InvalidSettingError("kv_cache=hf-quanto needs the model's config")
        if settings.bits not in (2, 4):
            raise InvalidSettingError("kv_cache=hf-quanto takes kv_bits 2 or 4")
        try:
            return QuantizedCache("quanto", config, nbits=settings.bits, q_group_size=settings.group,
                                  residual_length=settings.window)
        except ImportError as err:
            raise InvalidSettingError(f"kv_cache=hf-quanto needs optimum-quanto (make peers-quanto, or pip install "
                                      f"optimum-quanto): {err}") from None
    return CompressedCache(settings.kind, settings.bits, settings.rank, settings.outliers, settings.window,
                           settings.block, settings.group, settings.scale_bits, WINDOW_DTYPES[settings.window_dtype],
                           in_attention, settings.sink)


def make_cache_factory(settings: KVSettings | None, model=None):
    """For `CausalLM(model, cache_factory=...)`: None (the plain cache) when `settings` asks for none. With the
    exact runtime's attention, old blocks are read inside the attention kernel instead of decompressed."""
    if settings is None or settings.kind == "none":
        return None
    if model is None:
        return partial(make_cache, settings)
    return partial(make_cache, settings, model.config, attention.reads_blocks(model))


def _tensor_bytes(t) -> int:
    if not isinstance(t, torch.Tensor):
        if isinstance(t, (tuple, list)):
            return sum(_tensor_bytes(x) for x in t)
        if isinstance(t, dict):
            return sum(_tensor_bytes(x) for x in t.values())
        return 0
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # quanto's packed tensors
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def kv_bytes(cache) -> int:
    """Bytes the cache holds: the sum of its stored tensors' sizes (compressed blocks, exact window, scales,
    low-rank factors, outliers; for the plain cache its buffers, spare room included; for transformers' caches
    their key/value tensors)."""
    if cache is None:
        return 0
    if isinstance(cache, CompressedCache):
        return cache.nbytes
    total = 0
    for layer in getattr(cache, "layers", []):
        buffers = [getattr(getattr(layer, n, None), "data", None) for n in ("_k", "_v")]
        if any(isinstance(t, torch.Tensor) for t in buffers):  # the plain cache's growing buffers: capacity
            total += sum(_tensor_bytes(t) for t in buffers)
            continue
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _tensor_bytes(getattr(layer, name, None))
    return total


def settings_from_args(args) -> KVSettings | None:
    """KVSettings from the --kv-* command-line arguments (see `add_arguments`); None for --kv-cache none."""
    if getattr(args, "kv_cache", "none") in (None, "none"):
        return None
    changes = {k: getattr(args, f"kv_{k}") for k in ("rank", "outliers", "window", "block", "group", "sink")
               if getattr(args, f"kv_{k}", None) is not None}
    return KVSettings(kind=args.kv_cache, bits=args.kv_bits, **changes)


def options_from_args(args) -> dict:
    """The --kv-* arguments as Decoder keywords (empty for --kv-cache none)."""
    return options_of(settings_from_args(args))


def options_of(settings: KVSettings | None) -> dict:
    """Decoder keywords (kv_cache=..., kv_bits=...) that make the cache `settings` describes."""
    if settings is None:
        return {}
    return {key: getattr(settings, name) for key, name in OPTIONS.items()}


def add_arguments(p, kinds=ENGINE_KINDS) -> None:
    """--kv-cache, --kv-bits, --kv-rank, --kv-outliers, --kv-window, --kv-block, --kv-group, --kv-sink."""
    d = KVSettings()
    p.add_argument("--kv-cache", default="none", choices=kinds,
                   help="KV-cache compression (lossy): quant = per-group quantization, gear = quantization + "
                   "low-rank error + outliers kept apart (default none)")
    p.add_argument("--kv-bits", type=int, default=d.bits, choices=(2, 4, 8), help=f"bits per entry (default {d.bits})")
    by_bits = ", ".join(f"{b} bits: {v['rank']}" for b, v in BIT_DEFAULTS.items())
    p.add_argument("--kv-rank", type=int, default=None, help=f"gear: rank of the error per head and block "
                   f"(default by bits: {by_bits})")
    by_bits = ", ".join(f"{b} bits: {v['outliers']}" for b, v in BIT_DEFAULTS.items())
    p.add_argument("--kv-outliers", type=float, default=None, help=f"gear: fraction of entries kept apart in "
                   f"float16 (default by bits: {by_bits})")
    p.add_argument("--kv-window", type=int, default=None, help=f"recent tokens always exact, at least the longest "
                   f"draft (default {d.window})")
    p.add_argument("--kv-block", type=int, default=None, help=f"tokens compressed together (default {d.block})")
    p.add_argument("--kv-group", type=int, default=None, help="entries per quantization group: a key channel's "
                   "consecutive tokens, a value token's channels (default 16 at 2 bits, else 64)")
    p.add_argument("--kv-sink", type=int, default=None, help=f"first tokens kept exact, the attention sink "
                   f"(default {d.sink})")
