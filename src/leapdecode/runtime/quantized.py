"""Quantized modules that run on torch's CPU weight-only kernels, each a drop-in for `nn.Linear`/`nn.Embedding`.

| module | weight storage | kernel | activations |
| --- | --- | --- | --- |
| `Int4Linear` | 4-bit codes in groups of 32 along the input, W = (q - 8) * scale + zero | `_weight_int4pack_mm_for_cpu` | bf16 |
| `Int8Linear` | int8 codes, one scale per output row, W = q * scale | `_weight_int8pack_mm` | bf16 |
| `BF16Linear` | the dense weight in bf16 | `torch.matmul` | bf16 |
| `QuantEmbedding` | int8 codes, one scale per 32 values of a row (exactly GGUF's Q8_0) | gather + multiply | float32 |

Every module takes and returns the model's float32 hidden states: the input is rounded to bf16 for the kernel and
the output widened back, so norms, rotary embeddings, the residual stream and attention stay in float32.
The int4 and int8 kernels are row-invariant (a row's output does not depend on how many rows share the call),
which the exact runtime relies on; `tests/runtime/test_quantized.py` checks it.

`weight` is kept for callers that read the dense matrix (trained drafters' heads, draft vocabularies): it is
dequantized on first use and cached, so a plain decoding run never holds a float32 copy.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

GROUP = 32  # int4 group size along the input dimension (GGUF's block size)


SOURCE_ROWS = 16


def input_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a layer takes (float32 for the runtime's layers) without dequantizing its weight."""
    if isinstance(module, (_QuantLinear, QuantEmbedding)):
        return torch.float32
    return module.weight.dtype


def module_device(module: nn.Module) -> torch.device:
    """Where a layer's tensors are, without dequantizing its weight."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def leading_rows(module: nn.Module) -> torch.Tensor:
    """The first rows of a layer's weight as the checkpoint holds them, whatever the runtime made of the layer
    (identifies a model across weight formats: drafter and skip-set fingerprints)."""
    if isinstance(module, (_QuantLinear, QuantEmbedding)) and module.source_rows is not None:
        return module.source_rows
    return module.weight[:SOURCE_ROWS].detach().float().cpu()


class _LastInput(threading.local):
    """The last input rounded to bf16: q/k/v (and gate/up) read the same hidden states, rounded once."""

    source: torch.Tensor | None = None
    version: int = -1
    rounded: torch.Tensor | None = None


_LAST = _LastInput()


def _version(x: torch.Tensor) -> int:
    # inference tensors have no version counter; transformers' modeling code never writes into the hidden
    # states it hands to several projections
    return -2 if x.is_inference() else x._version


def _round_trip(x: torch.Tensor, features: int) -> torch.Tensor:
    if torch.compiler.is_compiling():  # a compiled graph rounds each input once by itself
        return x.reshape(-1, features).to(torch.bfloat16)
    if x is _LAST.source and _version(x) == _LAST.version and x.shape[-1] == features:
        return _LAST.rounded
    rounded = x.reshape(-1, features).to(torch.bfloat16)
    _LAST.source, _LAST.version, _LAST.rounded = x, _version(x), rounded
    return rounded


class _QuantLinear(nn.Module):
    """Shared parts: shapes, optional float32 bias, the lazily dequantized `weight`."""

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self._dense: torch.Tensor | None = None
        self.register_buffer("source_rows", None)  # the first rows of the weight it was made from

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # (R, in) bf16 -> (R, out) bf16
        raise NotImplementedError

    def shape_record(self) -> dict:
        """What `placeholder` needs to rebuild this module's empty shell (runtime/stored.py)."""
        return {"in": self.in_features, "out": self.out_features, "bias": self.bias is not None,
                "source_rows": None if self.source_rows is None else list(self.source_rows.shape)}

    @classmethod
    def placeholder(cls, record: dict) -> "_QuantLinear":
        """An instance with empty buffers of the recorded shapes, to be filled by `load_state_dict(assign=True)`."""
        module = cls.__new__(cls)
        _QuantLinear.__init__(module, record["in"], record["out"],
                              torch.empty(record["out"]) if record["bias"] else None)
        if record.get("source_rows"):
            module.source_rows = torch.empty(record["source_rows"])
        module._empty_buffers()
        return module

    def _empty_buffers(self) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(_round_trip(x, self.in_features)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) float32 weight the kernel computes with (dequantized once, then cached)."""
        if self._dense is None:
            eye = torch.eye(self.in_features, dtype=torch.bfloat16)
            with torch.no_grad():
                self._dense = self._matmul(eye).float().t().contiguous()
        return self._dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(_QuantLinear):
    """y = x W^T (+ b), W held as 4-bit codes with a bf16 scale and zero per group of 32 inputs."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None = None):
        """codes (out, in) integers in [0, 15]; scales, zeros (out, in / 32): W = (codes - 8) * scale + zero."""
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.register_buffer("packed", packed)  # (out, in / 2) uint8
        sz = torch.stack([scales.float().t(), zeros.float().t()], dim=-1)  # (in / 32, out, 2)
        self.register_buffer("scales_zeros", sz.to(torch.bfloat16).contiguous())

    @classmethod
    def supports(cls, out_features: int, in_features: int) -> bool:
        return out_features % 16 == 0 and in_features % GROUP == 0

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int4Linear":
        """Asymmetric min/max quantization of a dense weight, per group of 32 inputs (lossy)."""
        w = weight.detach().float()
        groups = w.reshape(w.shape[0], -1, GROUP)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = (hi - lo) / 15
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = ((groups - lo.unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp(0, 15)
        return cls(codes.reshape(w.shape), scale, lo + 8 * scale, bias)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)

    def _empty_buffers(self) -> None:
        n, k = self.out_features, self.in_features
        self.register_buffer("packed", torch.empty(n, k // 2, dtype=torch.uint8))
        self.register_buffer("scales_zeros", torch.empty(k // GROUP, n, 2, dtype=torch.bfloat16))


class Int8GroupLinear(_QuantLinear):
    """y = x W^T (+ b), W held as 8-bit codes with a scale and minimum per group of 32 inputs, computed as two
    int4 products on the int4 kernel: codes = 16 hi + lo, W = 16 s hi + s lo + minimum.

    GGUF's Q8_0 blocks (W = d q, q in [-128, 127]) are this layout exactly (s = d, minimum = -128 d); other
    higher-precision tensors (Q6_K, Q5_x, F16) are re-quantized to it, an error of 1/255 of a group's range.
    Two int4 passes cost less than the int8 kernel on the CPUs measured (README: runtime).
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor,
                 bias: torch.Tensor | None = None):
        """codes (out, in) integers in [0, 255]; scales, minimums (out, in / 32): W = codes * scale + minimum."""
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias)
        codes = codes.to(torch.int32)
        self.high = Int4Linear(codes >> 4, 16 * scales, minimums + 128 * scales)
        self.low = Int4Linear(codes & 15, scales, 8 * scales)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8GroupLinear":
        """Symmetric per group (like Q8_0): the zeros are then exact in bf16, only the scales are rounded."""
        w = weight.detach().float()
        groups = w.reshape(w.shape[0], -1, GROUP)
        scale = groups.abs().amax(-1) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (groups / safe.unsqueeze(-1)).round().clamp(-127, 127) + 128
        return cls(codes.reshape(w.shape), scale, -128 * scale, bias)

    @classmethod
    def from_q8_0(cls, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        """GGUF Q8_0: int8 codes (out, in) and their scale per 32 (out, in / 32)."""
        return cls(codes.to(torch.int32) + 128, scales, -128 * scales, bias)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # float32: the two halves are added unrounded
        return torch.add(self.high._matmul(x).float(), self.low._matmul(x))  # (the add widens the low half)

    def _empty_buffers(self) -> None:
        half = {"in": self.in_features, "out": self.out_features, "bias": False}
        self.high, self.low = Int4Linear.placeholder(half), Int4Linear.placeholder(half)


class Int8Linear(_QuantLinear):
    """y = x W^T (+ b), W held as int8 codes with one bf16 scale per output row."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias)
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.float().to(torch.bfloat16).contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Symmetric per-row quantization of a dense weight (lossy, small)."""
        w = weight.detach().float()
        scale = w.abs().amax(-1) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return cls((w / safe.unsqueeze(-1)).round().clamp(-127, 127), scale, bias)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scales)

    def _empty_buffers(self) -> None:
        self.register_buffer("codes", torch.empty(self.out_features, self.in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(self.out_features, dtype=torch.bfloat16))


class BF16Linear(_QuantLinear):
    """y = x W^T (+ b) with the dense weight rounded to bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.register_buffer("dense", weight.detach().to(torch.bfloat16).contiguous())

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dense.t()

    def _empty_buffers(self) -> None:
        self.register_buffer("dense", torch.empty(self.out_features, self.in_features, dtype=torch.bfloat16))


class QuantEmbedding(nn.Module):
    """An embedding table held as int8 codes with a float32 scale per 32 values of a row.

    GGUF's Q8_0 blocks are exactly this layout, so a Q8_0 table is represented without loss; other tables are
    quantized per block of 32 (symmetric). `multiplier` reproduces scaled embeddings (Gemma multiplies by
    sqrt(hidden)) in the same float32 arithmetic as the module it replaces.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, multiplier: torch.Tensor | None = None,
                 padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.padding_idx = padding_idx
        self.register_buffer("codes", codes.to(torch.int8).contiguous())  # (V, H)
        self.register_buffer("scales", scales.float().contiguous())  # (V, H / 32)
        self.multiplier = multiplier
        self._dense: torch.Tensor | None = None
        self.register_buffer("source_rows", None)  # the first rows of the table it was made from

    @classmethod
    def from_float(cls, weight: torch.Tensor, multiplier: torch.Tensor | None = None,
                   padding_idx: int | None = None) -> "QuantEmbedding":
        w = weight.detach().float()
        blocks = w.reshape(w.shape[0], -1, GROUP)
        scale = blocks.abs().amax(-1) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (blocks / safe.unsqueeze(-1)).round().clamp(-127, 127)
        return cls(codes.reshape(w.shape), scale, multiplier, padding_idx)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.codes[ids].float()
        s = self.scales[ids]
        out = (q.reshape(*q.shape[:-1], -1, GROUP) * s.unsqueeze(-1)).reshape(q.shape)
        if self.multiplier is not None:
            out = out * self.multiplier.to(out.dtype)
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rows(ids)

    def shape_record(self) -> dict:
        return {"num": self.num_embeddings, "dim": self.embedding_dim, "padding_idx": self.padding_idx,
                "source_rows": None if self.source_rows is None else list(self.source_rows.shape)}

    @classmethod
    def placeholder(cls, record: dict, multiplier: torch.Tensor | None = None) -> "QuantEmbedding":
        module = cls(torch.empty(record["num"], record["dim"], dtype=torch.int8),
                     torch.empty(record["num"], record["dim"] // GROUP), multiplier, record["padding_idx"])
        if record.get("source_rows"):
            module.source_rows = torch.empty(record["source_rows"])
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The dense (V, H) float32 table, without the multiplier (dequantized once, then cached)."""
        if self._dense is None:
            q = self.codes.float()
            self._dense = (q.reshape(q.shape[0], -1, GROUP) * self.scales.unsqueeze(-1)).reshape(q.shape)
        return self._dense

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per 32"
