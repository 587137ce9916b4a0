"""Quantized modules, each a drop-in for `nn.Linear`/`nn.Embedding`.

| module | weight storage | kernel | activations |
| --- | --- | --- | --- |
| `Int4Linear` | 4-bit codes in groups of 32 along the input, W = code * scale + minimum (GGUF Q4_0/Q4_1/Q4_K) | kernels/group_matmul.cpp | int8 per group of 32 |
| `Int8GroupLinear` | 8-bit codes in groups of 32, W = code * scale + minimum (GGUF Q8_0) | kernels/group_matmul.cpp | int8 per group of 32 |
| `Int6Linear` | GGUF Q6_K as it is: 6-bit codes, an int8 scale per 16 inputs, a float16 unit per 256, W = unit * sc * (code - 32) | kernels/group_matmul.cpp | int8 per group of 32 |
| `Int8Linear` | int8 codes, one scale per output row, W = q * scale (shapes the group layout cannot take) | `_weight_int8pack_mm` | bf16 |
| `BF16Linear` | the dense weight in bf16 | `torch.matmul` | bf16 |
| `QuantEmbedding` | int8 codes, one scale per 32 values of a row (exactly GGUF's Q8_0) | gather + multiply | float32 |

Every module takes and returns the model's float32 hidden states, so norms, rotary embeddings, the residual
stream and attention stay in float32. The group modules quantize their input per group of 32 values to int8
(scale = max |x| / 127), as llama.cpp does for its quantized matmuls, and compute integer dot products per group:
exact in any order, so a row's output never depends on the other rows of the call. The other kernels round the
input to bf16; torch's int8 kernel is row-invariant too, bf16 matmuls are not. `tests/runtime/test_quantized.py`
checks it.

`weight` is kept for callers that read the dense matrix (trained drafters' heads, draft vocabularies): it is
dequantized on first use and cached, so a plain decoding run never holds a float32 copy.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from . import native

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

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the kernel takes it: (R, in) rounded to bf16."""
        return _round_trip(x, self.in_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # (R, in) -> (R, out)
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) float32 weight the kernel computes with."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return self._matmul(eye).float().t().contiguous()

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
        y = self._matmul(self._prepare(x)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) float32 weight the kernel computes with (dequantized once, then cached)."""
        if self._dense is None:
            with torch.no_grad():
                self._dense = self.dense_weight()
        return self._dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, in) codes in [0, 2^bits) -> the kernel's layout (out / 16, in / 32, 256 or 512) uint8: per block of 16
    output columns and group of 32 inputs, 8 quads of 4 inputs, 64 bytes each (byte 4 * column + i); 4-bit codes
    two quads to a byte (quad 2p in the low nibble, 2p + 1 in the high one)."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n // 16, 16, k // GROUP, 8, 4).permute(0, 2, 3, 1, 4)  # block, group, quad, col, i
    if bits == 8:
        return c.reshape(n // 16, k // GROUP, 512).contiguous()
    return (c[:, :, 0::2] | (c[:, :, 1::2] << 4)).reshape(n // 16, k // GROUP, 256).contiguous()


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack`'s inverse: (out, in) uint8 codes."""
    blocks, groups, _ = packed.shape
    if bits == 8:
        c = packed.reshape(blocks, groups, 8, 16, 4)
    else:
        p = packed.reshape(blocks, groups, 4, 1, 16, 4)
        c = torch.cat([p & 15, p >> 4], dim=3).reshape(blocks, groups, 8, 16, 4)
    return c.permute(0, 3, 1, 2, 4).reshape(blocks * 16, groups * GROUP)


SIX_BIT_BYTES = 384  # per block of 16 columns and group of 32 inputs: the low nibbles, then the top bits


def pack6(codes: torch.Tensor, sub_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) codes in [0, 64) and (out, in / 16) int8 sub-scales -> the kernel's 6-bit layout: codes
    (out / 16, in / 32, 384) uint8, the low 4 bits as `pack` lays out 4-bit codes (256 bytes) then the top 2 bits
    (128 bytes: byte 4 * column + i of half h holds quads 4h..4h+3 at bits 0-1, 2-3, 4-5, 6-7); sub-scales
    (out / 16, in / 32, 32) int8, per group half 0's 16 columns then half 1's."""
    n, k = codes.shape
    codes = codes.to(torch.uint8)
    low = pack(codes & 15, 4)
    top = (codes >> 4).reshape(n // 16, 16, k // GROUP, 2, 4, 4).permute(0, 2, 3, 1, 5, 4)  # blk, grp, half, col, i, q
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    top = (top << shifts).sum(-1, dtype=torch.uint8).reshape(n // 16, k // GROUP, 128)
    sub = sub_scales.to(torch.int8).reshape(n // 16, 16, k // GROUP, 2).permute(0, 2, 3, 1)
    return torch.cat([low, top], dim=-1).contiguous(), sub.reshape(n // 16, k // GROUP, 32).contiguous()


def unpack6(packed: torch.Tensor, sub_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack6`'s inverse: (out, in) uint8 codes and (out, in / 16) int8 sub-scales."""
    blocks, groups, _ = packed.shape
    low = unpack(packed[..., :256].contiguous(), 4)
    top = packed[..., 256:].reshape(blocks, groups, 2, 16, 4, 1)
    top = (top >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)) & 3  # blk, grp, half, col, i, quad
    top = top.permute(0, 3, 1, 2, 5, 4).reshape(blocks * 16, groups * GROUP)
    sub = sub_scales.reshape(blocks, groups, 2, 16).permute(0, 3, 1, 2)
    return low | (top << 4), sub.reshape(blocks * 16, groups * 2)


def per_block(values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, in / 32) per-group values -> (out / 16, in / 32, 16), the kernel's order."""
    n, g = values.shape
    return values.to(dtype).reshape(n // 16, 16, g).permute(0, 2, 1).contiguous()


def half_exact(*values: torch.Tensor) -> bool:
    """Whether every value is a float16 number (GGUF's scales are): then they are stored in half the bytes."""
    return all(torch.equal(v.float().half().float(), v.float()) for v in values)


def fp16_grid(values: torch.Tensor) -> torch.Tensor:
    """Values rounded to float16 where that keeps them normal float16 numbers (quantizing on load picks its
    scales from this grid, as GGUF does, so they can be stored as float16)."""
    v = values.float()
    h = v.half().float()
    return torch.where(torch.isfinite(h) & ((h.abs() >= 2 ** -14) | (v == 0)), h, v)


def per_row(values: torch.Tensor) -> torch.Tensor:
    """`per_block`'s inverse: (out, in / 32)."""
    blocks, g, _ = values.shape
    return values.permute(0, 2, 1).reshape(blocks * 16, g)


SPAN = 8  # groups per float16 unit of factored scales (GGUF Q4_K's super-block of 256 weights)
NO_UNIT = torch.empty(0, dtype=torch.float16)  # the unit argument of scales that are not factored


@dataclass(frozen=True)
class ScaleFactors:
    """Per-group scales and minimums as an 8-bit step per group times a float16 unit per `SPAN` groups (GGUF Q4_K:
    scale = d * sc, minimum = -dmin * m). Each product is exact in float32, and the kernel reads 2.5 bytes per group
    instead of 8."""

    scale_steps: torch.Tensor  # (out, in / 32) integers in [0, 255]
    scale_units: torch.Tensor  # (out, in / 256) float16
    minimum_steps: torch.Tensor
    minimum_units: torch.Tensor

    @staticmethod
    def product(steps: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Float32 values from steps (out, groups, ...) and units (out, groups / SPAN, ...): per row, or in the
        kernel's (blocks, groups, 16) layout."""
        return steps.float() * units.float().repeat_interleave(SPAN, dim=1)


def expand_scales(values: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """A kernel-layout (blocks, groups, 16) scale tensor as float32: factored steps (uint8) times their units."""
    return ScaleFactors.product(values, unit) if values.dtype == torch.uint8 else values.float()


def reference_group_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                           bits: int, scale_unit: torch.Tensor = NO_UNIT,
                           minimum_unit: torch.Tensor = NO_UNIT) -> torch.Tensor:
    """The bits of kernels/group_matmul.cpp computed with torch operations (its fallback without a compiler, and
    the tests' reference): activations quantized to int8 per group of 32, integer dot products per group, then
    five float32 operations per group added in order."""
    rows, k = x.shape
    groups = k // GROUP
    xg = x.float().reshape(rows, groups, GROUP)
    d = xg.abs().amax(-1) / 127
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.where(d.unsqueeze(-1) == 0, 0.0, torch.round(xg / safe.unsqueeze(-1))).clamp(-127, 127)
    if bits == 6:
        return _reference_six_bit(q, d, codes, minimum, scale)
    qsum = q.sum(-1)  # small integers: exact in any order
    w = unpack(codes, bits).float().reshape(-1, groups, GROUP)  # (n, groups, 32)
    dot = torch.bmm(q.transpose(0, 1), w.permute(1, 2, 0))  # (groups, rows, n); integers below 2^24: exact
    scale, minimum = per_row(expand_scales(scale, scale_unit)), per_row(expand_scales(minimum, minimum_unit))
    out = torch.zeros(rows, w.shape[0])
    for g in range(groups):
        t = dot[g] * scale[:, g]
        t = t + minimum[:, g] * qsum[:, g:g + 1]
        out = out + t * d[:, g:g + 1]
    return out


def _reference_six_bit(q: torch.Tensor, d: torch.Tensor, codes: torch.Tensor, sub_scales: torch.Tensor,
                       units: torch.Tensor) -> torch.Tensor:
    """`reference_group_matmul` for 6-bit weights (sub-scales in the minimum's place, units in the scale's), from
    the quantized activations q (rows, groups, 32) and their scales d (rows, groups): per group the integer dot
    with both halves' sub-scales, then two float32 operations."""
    rows, groups, _ = q.shape
    code, sub = unpack6(codes, sub_scales)
    n = code.shape[0]
    signed = (code.long() - 32).reshape(n, groups * 2, 16)
    halves = torch.einsum("rhi,nhi->hrn", q.long().reshape(rows, groups * 2, 16), signed)  # exact integers
    dot = halves * sub.long().t().unsqueeze(1)  # (groups * 2, rows, n)
    dot = (dot[0::2] + dot[1::2]).float()  # below 2^24: exact
    unit = per_row(units.float()).repeat_interleave(SPAN, dim=1)  # (n, groups)
    out = torch.zeros(rows, n)
    for g in range(groups):
        out = out + (dot[g] * unit[:, g]) * d[:, g:g + 1]
    return out


def _group_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                  scale_unit: torch.Tensor, minimum_unit: torch.Tensor, bits: int) -> torch.Tensor:
    kernels = native.kernels()
    if kernels is None:
        return reference_group_matmul(x, codes, scale, minimum, bits, scale_unit, minimum_unit)
    return kernels.group_matmul(x, codes, scale, minimum, scale_unit, minimum_unit, bits)


def _group_matmul_shape(x, codes, scale, minimum, scale_unit, minimum_unit, bits):
    return x.new_empty(x.shape[0], codes.shape[0] * 16)


# An opaque op for compiled graphs (the eager path calls the kernel directly, without the dispatcher).
_LIBRARY = torch.library.Library("leapdecode", "FRAGMENT")
_LIBRARY.define("group_matmul(Tensor x, Tensor codes, Tensor scale, Tensor minimum, Tensor scale_unit, "
                "Tensor minimum_unit, int bits) -> Tensor")
_LIBRARY.impl("group_matmul", _group_matmul, "CompositeExplicitAutograd")
torch.library.register_fake("leapdecode::group_matmul", _group_matmul_shape, lib=_LIBRARY)


class GroupLinear(_QuantLinear):
    """y = x W^T (+ b), W held as `BITS`-bit codes with a scale and minimum per group of 32 inputs,
    W = code * scale + minimum (GGUF's 4-bit types and Q8_0 exactly), computed by kernels/group_matmul.cpp with
    the activations quantized to int8 per group of 32 (as llama.cpp does): integer dot products, row-invariant.
    Scales and minimums are stored factored when `factors` are given (Q4_K: uint8 steps, float16 units), as
    float16 when they all are float16 numbers (Q4_0, Q4_1, Q8_0, and layers quantized on load), else as float32."""

    BITS = 4

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor,
                 bias: torch.Tensor | None = None, factors: ScaleFactors | None = None):
        """codes (out, in) integers in [0, 2^BITS); scales, minimums (out, in / 32): W = codes * scale + minimum;
        `factors`, when given, must multiply out to exactly `scales` and `minimums`."""
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias)
        self.register_buffer("codes", pack(codes, self.BITS))
        if factors is not None:
            f = factors
            if not (torch.equal(f.product(f.scale_steps, f.scale_units), scales.float())
                    and torch.equal(f.product(f.minimum_steps, f.minimum_units), minimums.float())):
                raise ValueError("scale factors do not multiply out to the scales")
            self.register_buffer("scale", per_block(f.scale_steps, torch.uint8))
            self.register_buffer("minimum", per_block(f.minimum_steps, torch.uint8))
            self.register_buffer("scale_unit", per_block(f.scale_units, torch.float16))
            self.register_buffer("minimum_unit", per_block(f.minimum_units, torch.float16))
            return
        dtype = torch.float16 if half_exact(scales, minimums) else torch.float32
        self.register_buffer("scale", per_block(scales, dtype))
        self.register_buffer("minimum", per_block(minimums, dtype))
        self.register_buffer("scale_unit", NO_UNIT.clone())
        self.register_buffer("minimum_unit", NO_UNIT.clone())

    @classmethod
    def supports(cls, out_features: int, in_features: int) -> bool:
        return out_features % 16 == 0 and in_features % GROUP == 0

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.in_features).float().contiguous()

    def matrix(self) -> list[torch.Tensor]:
        """The tensors the kernel takes for this matrix: codes, scale, minimum, scale_unit, minimum_unit."""
        return [self.codes, self.scale, self.minimum, self.scale_unit, self.minimum_unit]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, *self.matrix(), self.BITS)
        if torch.compiler.is_compiling():
            return torch.ops.leapdecode.group_matmul(*args)
        return _group_matmul(*args)

    def dense_weight(self) -> torch.Tensor:
        groups = self.in_features // GROUP
        codes = unpack(self.codes, self.BITS).float().reshape(self.out_features, groups, GROUP)
        scale = per_row(expand_scales(self.scale, self.scale_unit)).unsqueeze(-1)
        minimum = per_row(expand_scales(self.minimum, self.minimum_unit)).unsqueeze(-1)
        return (codes * scale + minimum).reshape(self.out_features, self.in_features)

    def shape_record(self) -> dict:
        return {**super().shape_record(), "scale_dtype": str(self.scale.dtype).removeprefix("torch.")}

    @classmethod
    def placeholder(cls, record: dict) -> "GroupLinear":
        module = super().placeholder(record)
        dtype = getattr(torch, record.get("scale_dtype", "float32"))
        module.scale, module.minimum = module.scale.to(dtype), module.minimum.to(dtype)
        if dtype == torch.uint8:
            units = torch.empty(module.scale.shape[0], module.scale.shape[1] // SPAN, 16, dtype=torch.float16)
            module.scale_unit, module.minimum_unit = units, units.clone()
        return module

    def _empty_buffers(self) -> None:
        blocks, groups = self.out_features // 16, self.in_features // GROUP
        self.register_buffer("codes", torch.empty(blocks, groups, 32 * self.BITS * 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.empty(blocks, groups, 16))
        self.register_buffer("minimum", torch.empty(blocks, groups, 16))
        self.register_buffer("scale_unit", NO_UNIT.clone())
        self.register_buffer("minimum_unit", NO_UNIT.clone())


def _codes(groups: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The nearest 4-bit codes of (rows, groups, 32) values for a scale and minimum per group."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((groups - minimum.unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp(0, 15)


class Int4Linear(GroupLinear):
    """4-bit codes per group of 32 (GGUF Q4_0, Q4_1, Q4_K with factored scales)."""

    BITS = 4

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, refine: int = 4) -> "Int4Linear":
        """Asymmetric quantization of a dense weight per group of 32 inputs (lossy): min/max to start, then
        `refine` rounds of least squares (the scale and minimum that best fit the codes, then the codes that best
        fit them), keeping per group whichever fit had the smallest squared error."""
        w = weight.detach().float()
        groups = w.reshape(w.shape[0], -1, GROUP)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale, minimum = fp16_grid((hi - lo) / 15), fp16_grid(lo)
        codes = _codes(groups, scale, minimum)
        best = ((codes * scale.unsqueeze(-1) + minimum.unsqueeze(-1) - groups) ** 2).sum(-1)
        for _ in range(refine):
            c = codes
            mean_c, mean_w = c.mean(-1), groups.mean(-1)
            var_c = ((c - mean_c.unsqueeze(-1)) ** 2).mean(-1)
            cov = ((c - mean_c.unsqueeze(-1)) * (groups - mean_w.unsqueeze(-1))).mean(-1)
            fit_scale = torch.where(var_c > 0, cov / torch.where(var_c > 0, var_c, 1.0), scale)
            fit_scale = fp16_grid(fit_scale.clamp_min(0))
            fit_min = fp16_grid(mean_w - fit_scale * mean_c)
            fit_codes = _codes(groups, fit_scale, fit_min)
            err = ((fit_codes * fit_scale.unsqueeze(-1) + fit_min.unsqueeze(-1) - groups) ** 2).sum(-1)
            better = err < best
            scale, minimum = torch.where(better, fit_scale, scale), torch.where(better, fit_min, minimum)
            codes = torch.where(better.unsqueeze(-1), fit_codes, codes)
            best = torch.minimum(err, best)
        return cls(codes.reshape(w.shape), scale, minimum, bias)


class Int8GroupLinear(GroupLinear):
    """8-bit codes per group of 32: GGUF's Q8_0 blocks (W = d q, q in [-128, 127]) exactly, as codes q + 128 with
    minimum -128 d; other higher-precision tensors (Q6_K, Q5_x, F16) are re-quantized to it, an error of 1/254 of a
    group's largest magnitude."""

    BITS = 8

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8GroupLinear":
        """Symmetric per group (like Q8_0)."""
        w = weight.detach().float()
        groups = w.reshape(w.shape[0], -1, GROUP)
        scale = fp16_grid(groups.abs().amax(-1) / 127)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (groups / safe.unsqueeze(-1)).round().clamp(-127, 127) + 128
        return cls(codes.reshape(w.shape), scale, -128 * scale, bias)

    @classmethod
    def from_q8_0(cls, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        """GGUF Q8_0: int8 codes (out, in) and their scale per 32 (out, in / 32)."""
        return cls(codes.to(torch.int32) + 128, scales, -128 * scales, bias)


class Int6Linear(GroupLinear):
    """GGUF's Q6_K blocks as they are: 6-bit codes, an int8 sub-scale per 16 inputs and a float16 unit per 256,
    W = unit * sub_scale * (code - 32); 0.82 bytes a weight read per pass (8-bit groups take 1.125). The kernel
    takes the sub-scales in the minimum's place and the units in the scale's (kernels/group_matmul.cpp)."""

    BITS = 6

    def __init__(self, codes: torch.Tensor, sub_scales: torch.Tensor, units: torch.Tensor,
                 bias: torch.Tensor | None = None):
        """codes (out, in) integers in [0, 64); sub_scales (out, in / 16) int8; units (out, in / 256) float16."""
        out_features, in_features = codes.shape
        _QuantLinear.__init__(self, in_features, out_features, bias)
        packed, sub = pack6(codes, sub_scales)
        self.register_buffer("codes", packed)
        self.register_buffer("sub_scale", sub)
        self.register_buffer("unit", per_block(units, torch.float16))

    def matrix(self) -> list[torch.Tensor]:
        return [self.codes, self.unit, self.sub_scale, NO_UNIT, NO_UNIT]

    @classmethod
    def supports(cls, out_features: int, in_features: int) -> bool:
        return out_features % 16 == 0 and in_features % (GROUP * SPAN) == 0

    def dense_weight(self) -> torch.Tensor:
        codes, sub = unpack6(self.codes, self.sub_scale)
        step = per_row(self.unit.float()).repeat_interleave(SPAN * 2, dim=1) * sub.float()  # exact: float16 * int8
        w = step.unsqueeze(-1) * (codes.float() - 32).reshape(self.out_features, -1, 16)
        return w.reshape(self.out_features, self.in_features)

    def shape_record(self) -> dict:
        return _QuantLinear.shape_record(self)

    @classmethod
    def placeholder(cls, record: dict) -> "Int6Linear":
        return super(GroupLinear, cls).placeholder(record)  # its buffers' dtypes are fixed

    def _empty_buffers(self) -> None:
        blocks, groups = self.out_features // 16, self.in_features // GROUP
        self.register_buffer("codes", torch.empty(blocks, groups, SIX_BIT_BYTES, dtype=torch.uint8))
        self.register_buffer("sub_scale", torch.empty(blocks, groups, 32, dtype=torch.int8))
        self.register_buffer("unit", torch.empty(blocks, groups // SPAN, 16, dtype=torch.float16))


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
        # the group count spelled out: ids may be empty (a drafter embedding no tokens), as nn.Embedding allows
        out = (q.reshape(*q.shape[:-1], self.embedding_dim // GROUP, GROUP) * s.unsqueeze(-1)).reshape(q.shape)
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
