"""The one seam where a loaded transformers model gets its runtime: quantized modules and the exact attention.

`apply_runtime(model, weights, gguf)` swaps every `nn.Linear` (and the input embedding) for a module of
`quantized.py` and, in the modes that claim exactness (`use_exact_passes`), swaps RMS norms and gated MLPs for
the one-call modules of `fused.py` and selects the row-invariant attention of `attention.py` through
`set_attn_implementation`. Nothing else in the model changes: its modeling code, cache, masks and position ids
are transformers' own.

| `weights` | linear layers | embedding | attention | exact (row-invariant) |
| --- | --- | --- | --- | --- |
| `int4` (CPU default) | a GGUF's 4-bit blocks as they are (Q4_0/Q4_1/Q4_K), and its Q6_K blocks as they are (6-bit); its other higher-precision tensors as 8-bit groups (Q8_0 exactly); other checkpoints quantized to int4 groups of 32 | int8 per 32 values (Q8_0 exactly) | exact | yes |
| `int4-all` (the default for draft models) | as `int4`, but a GGUF's higher-precision tensors (Q5_x, Q6_K, Q8_0, the output layer) re-quantized to int4 groups too: fewer bytes a pass, a measured loss against the file | as `int4` | exact | yes |
| `int8` | 8-bit codes per group of 32 (symmetric) | int8 per 32 values | exact | yes |
| `bf16` | dense bf16 (oneDNN/MKL) | unchanged | SDPA | no: bf16 matmuls are not row-invariant |
| `fp32` (reference) | dense float32 (MKL) | unchanged | SDPA | no: identical up to floating-point noise |

In the modes that are not exact, a lossless method's output equals plain decoding's up to floating-point noise:
a near-tie between two tokens can be broken differently in a pass of another shape (the bench counts it).
"""
from __future__ import annotations

import ctypes
import gc
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import attention, fused
from .gguf_blocks import FOUR_BIT, grouped_codes, permute_rows, q6_k_codes, q8_0_codes
from .quantized import SOURCE_ROWS, BF16Linear, Int4Linear, Int6Linear, Int8GroupLinear, Int8Linear, QuantEmbedding


class Weights(str, Enum):
    INT4 = "int4"
    INT4_ALL = "int4-all"
    INT8 = "int8"
    BF16 = "bf16"
    FP32 = "fp32"

    @property
    def exact(self) -> bool:
        """Whether passes are row-invariant in this mode (a token's logits independent of the pass shape)."""
        return self in (Weights.INT4, Weights.INT4_ALL, Weights.INT8)


WEIGHT_CHOICES = tuple(w.value for w in Weights)
WEIGHTS_HELP = ("runtime: int4 (the CPU default: a GGUF's 4-bit and Q6_K blocks as they are, its other "
                "higher-precision tensors as 8-bit groups; exact passes), int4-all (every layer in 4-bit groups: "
                "faster, a small measured loss against the file; exact passes), int8, bf16, or fp32 (the float32 "
                "reference, identical only up to floating-point noise)")


@dataclass(frozen=True)
class RuntimeInfo:
    """How a loaded model computes: its weights mode, whether passes are exact, what each layer became."""

    weights: Weights = Weights.FP32
    exact: bool = False
    layers: dict[str, int] = field(default_factory=dict)  # "int4 from GGUF Q4_1" -> count
    compiled: bool = False  # single-sequence passes run as compiled graphs (runtime/compiled.py)

    def describe(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.layers.items())) or "dense float32"
        passes = f"{'exact' if self.exact else 'not row-invariant'}{', compiled' if self.compiled else ''} passes"
        return f"weights {self.weights.value} ({kinds}); {passes}"


def parse_weights(value: str | Weights | None, device: str, draft: bool = False) -> Weights:
    """`None`/"auto" -> int4 on a CPU (int4-all for a draft model, whose weights only decide how many of its
    tokens are accepted, never the output), fp32 elsewhere (the quantized kernels are CPU kernels)."""
    if value is None or value == "auto":
        if not str(device).startswith("cpu"):
            return Weights.FP32
        return Weights.INT4_ALL if draft else Weights.INT4
    try:
        chosen = Weights(value)
    except ValueError:
        raise ValueError(f"unknown weights {value!r}; use one of {', '.join(WEIGHT_CHOICES)} or auto") from None
    if chosen.exact and not str(device).startswith("cpu"):
        raise ValueError(f"weights {chosen.value} run on the CPU kernels only; use --weights fp32 or bf16 on {device}")
    return chosen


# ----- GGUF tensors ---------------------------------------------------------------------------------------

class GGUFTensors:
    """The tensors of a GGUF file by HF module name, with llama's q/k row order undone."""

    def __init__(self, path: str | Path, config):
        import gguf

        self.reader = gguf.GGUFReader(str(path))
        self.by_name = {t.name: t for t in self.reader.tensors}
        self.config = config
        model_type = config.model_type.removesuffix("_text")
        arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == model_type), None)
        self.names = gguf.get_tensor_name_map(arch, config.num_hidden_layers) if arch is not None else None
        self.model_type = model_type

    def find(self, module_name: str):
        if self.names is None:
            return None
        name = self.names.get_name(module_name)
        tensor = self.by_name.get(f"{name}.weight") if name else None
        if tensor is None and module_name.endswith("lm_head"):  # tied output layer
            tensor = self.by_name.get("token_embd.weight")
        return tensor

    def row_order(self, module_name: str, rows: int) -> np.ndarray | None:
        """GGUF stores llama's q/k rows interleaved for its rotary code; the HF order, or None if unchanged."""
        if self.model_type != "llama" or not module_name.endswith(("q_proj", "k_proj")):
            return None
        cfg = self.config
        heads = cfg.num_attention_heads if module_name.endswith("q_proj") else cfg.num_key_value_heads
        return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)


def _dense(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    return dequantize(tensor.data, tensor.tensor_type).reshape(tensor.data.shape[0], -1)


def _blocks_of(tensor, hf_weight: torch.Tensor, order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A GGUF tensor's raw blocks and dequantized values in the model's row order, or None when they are not the
    weight the model holds."""
    raw, dense = tensor.data, _dense(tensor)
    if order is not None:
        raw, dense = permute_rows(raw, order), permute_rows(dense, order)
    if dense.shape != tuple(hf_weight.shape) or not np.array_equal(dense, hf_weight.float().numpy()):
        return None  # not the tensor the model holds: quantize from the model's weight instead
    return np.ascontiguousarray(raw), dense


def _int4_from_gguf(tensor, hf_weight: torch.Tensor, order: np.ndarray | None) -> Int4Linear | None:
    blocks = _blocks_of(tensor, hf_weight, order)
    if blocks is None:
        return None
    codes = grouped_codes(tensor.tensor_type.name, *blocks)
    return Int4Linear(codes.codes, codes.scales, codes.minimums, factors=codes.factors)


def _int6_from_gguf(tensor, hf_weight: torch.Tensor, order: np.ndarray | None) -> Int6Linear | None:
    blocks = _blocks_of(tensor, hf_weight, order)
    if blocks is None or not Int6Linear.supports(*hf_weight.shape):
        return None
    codes = q6_k_codes(*blocks)
    return Int6Linear(codes.codes, codes.sub_scales, codes.units)


# GGUF types whose blocks the runtime holds as they are: the module maker and the form's name in the load line
_KEPT_AS_THEY_ARE = {**dict.fromkeys(FOUR_BIT, (_int4_from_gguf, "int4")), "Q6_K": (_int6_from_gguf, "6-bit")}


# ----- the swap ---------------------------------------------------------------------------------------------

def _linear_for(name: str, linear: nn.Linear, weights: Weights, gguf: GGUFTensors | None) -> tuple[nn.Module, str]:
    w, b = linear.weight, linear.bias
    if weights is Weights.BF16:
        return BF16Linear(w, b), "bf16"
    if not Int4Linear.supports(*w.shape):
        return Int8Linear.from_float(w, b), "int8 per row"
    if weights is Weights.INT8:
        return Int8GroupLinear.from_float(w, b), "8-bit groups"
    tensor = gguf.find(name) if gguf is not None else None
    if tensor is None:
        return Int4Linear.from_float(w, b), "int4 quantized on load"
    kind = tensor.tensor_type.name
    if weights is Weights.INT4_ALL and kind not in FOUR_BIT:
        return Int4Linear.from_float(w, b), f"int4 re-quantized from GGUF {kind}"
    if kind in _KEPT_AS_THEY_ARE:
        made, form = _KEPT_AS_THEY_ARE[kind]
        module = made(tensor, w, gguf.row_order(name, w.shape[0]))
        if module is not None:
            if b is not None:
                module.bias = nn.Parameter(b.detach().float(), requires_grad=False)
            return module, f"{form} from GGUF {kind}"
        if kind in FOUR_BIT:
            return Int4Linear.from_float(w, b), "int4 quantized on load"
    if kind == "Q8_0" and tuple(tensor.data.shape)[0] == w.shape[0] and gguf.row_order(name, w.shape[0]) is None:
        blocks = q8_0_codes(np.ascontiguousarray(tensor.data), w.shape[0])
        module = Int8GroupLinear.from_q8_0(blocks.codes, blocks.scales, b)
        rebuilt = (blocks.codes.float().reshape(w.shape[0], -1, 32) * blocks.scales.unsqueeze(-1)).reshape(w.shape)
        if torch.equal(rebuilt, w.float()):
            return module, "8-bit groups from GGUF Q8_0"
    return Int8GroupLinear.from_float(w, b), f"8-bit groups from GGUF {kind}"


def _embedding_for(name: str, emb: nn.Embedding, gguf: GGUFTensors | None) -> tuple[nn.Module, str]:
    multiplier = getattr(emb, "embed_scale", None)  # Gemma's scaled embedding (a buffer of that module class)
    tensor = gguf.find(name) if gguf is not None else None
    if tensor is not None and tensor.tensor_type.name == "Q8_0" and tuple(tensor.data.shape)[0] == emb.weight.shape[0]:
        blocks = q8_0_codes(np.ascontiguousarray(tensor.data), emb.weight.shape[0])
        module = QuantEmbedding(blocks.codes, blocks.scales, multiplier, emb.padding_idx)
        if torch.equal(module.weight, emb.weight.float()):
            return module, "int8 embedding from GGUF Q8_0"
    return QuantEmbedding.from_float(emb.weight, multiplier, emb.padding_idx), "int8 embedding per 32"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _own_storage(model: nn.Module) -> None:
    """Give every tensor storage of its own: loaded from a memory-mapped checkpoint they are slices of it, which
    would keep a whole float32 file resident, and sit wherever the file put them (torch's int8 kernel crashed on
    codes 8 bytes off a 64-byte boundary); torch's allocator aligns what it allocates."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                param.data = param.data.clone()
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None:
                    setattr(module, name, buf.clone())
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """Return freed memory to the system (glibc keeps freed pages of small allocations otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def apply_runtime(model: nn.Module, weights: Weights, gguf_path: str | Path | None = None) -> RuntimeInfo:
    """Swap the model's layers for the `weights` mode in place; returns what each layer became."""
    if weights is Weights.FP32:
        return RuntimeInfo(Weights.FP32, exact=False)
    gguf = GGUFTensors(gguf_path, model.config.get_text_config()) if gguf_path is not None else None
    counts: Counter[str] = Counter()
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the output layer gets its own module from here on
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear):
                new, kind = _linear_for(name, module, weights, gguf)
            elif isinstance(module, nn.Embedding) and weights is not Weights.BF16 and name.endswith("embed_tokens"):
                new, kind = _embedding_for(name, module, gguf)
            else:
                continue
            new.source_rows = module.weight[:SOURCE_ROWS].detach().float().cpu().clone()
            _replace(model, name, new)
            counts[kind] += 1
    del gguf  # its memory map of the file, before the heap is trimmed
    _own_storage(model)
    if weights.exact:
        counts.update(use_exact_passes(model))
    return RuntimeInfo(weights, exact=weights.exact, layers=dict(counts))


def use_exact_passes(model: nn.Module) -> dict[str, int]:
    """The exact modes' part of the seam, for a model whose linear layers are quantized modules already (converted
    here, or read back by `stored.load`): fused norms and MLPs, and the row-invariant attention. Returns how many
    modules of each kind were fused."""
    fused_counts = fused.fuse(model)
    model.set_attn_implementation(attention.register())
    return fused_counts
