"""Read a GGUF file's quantized blocks as they are, for the quantized modules (no float32 round trip).

GGUF 4-bit types store, per group of 32 weights of a row, a scale and a minimum such that
`w = scale * q + minimum` with q in [0, 15]:

| type | block | scale | minimum |
| --- | --- | --- | --- |
| Q4_0 | 32 values: fp16 d, 16 bytes of codes | d | -8 d |
| Q4_1 | 32 values: fp16 d, fp16 m, 16 bytes of codes | d | m |
| Q4_K | 256 values: fp16 d, fp16 dmin, 12 bytes of 6-bit (sc, m) for 8 groups, 128 bytes of codes | d * sc | -dmin * m |

The runtime's group modules hold exactly this form (code, scale, minimum), so nothing is rounded; Q4_K's scales
are kept as their two GGUF factors (`ScaleFactors`: the 6-bit sc and m per group, d and -dmin per super-block).
The codes are recovered from gguf's own dequantized values (q = round((w - minimum) / scale)), which keeps this
module independent of each type's nibble order, and checked against them. Q8_0 blocks (fp16 d, 32 int8 codes)
map exactly onto `QuantEmbedding` and the 8-bit groups; Q6_K blocks (256 values: 128 bytes of low nibbles, 64 of
top bits, 16 int8 sub-scales, fp16 d; w = d * sc * (q - 32), q in [0, 63], one sc per 16 values) onto
`Int6Linear`. Other types (Q5_x, ...) are returned dequantized.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .quantized import ScaleFactors

FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")


@dataclass(frozen=True)
class GroupedCodes:
    """A (out, in) matrix as 4-bit codes with a scale and minimum per group of 32: W = codes * scale + minimum."""

    codes: torch.Tensor  # (out, in) uint8 in [0, 15]
    scales: torch.Tensor  # (out, in / 32) float32
    minimums: torch.Tensor  # (out, in / 32) float32
    factors: ScaleFactors | None = None  # Q4_K: the scales and minimums as GGUF factors them


@dataclass(frozen=True)
class BlockCodes8:
    """A (rows, cols) matrix as int8 codes with a scale per 32 values of a row (GGUF Q8_0): W = codes * scale."""

    codes: torch.Tensor  # (rows, cols) int8
    scales: torch.Tensor  # (rows, cols / 32) float32


@dataclass(frozen=True)
class SixBitCodes:
    """A (out, in) matrix as GGUF Q6_K holds it: W = unit * sub_scale * (code - 32)."""

    codes: torch.Tensor  # (out, in) uint8 in [0, 63]
    sub_scales: torch.Tensor  # (out, in / 16) int8
    units: torch.Tensor  # (out, in / 256) float16


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _q4k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs of each Q4_K super-block from its 12 packed bytes -> (.., 8) each."""
    s = packed.astype(np.uint16)
    sc = np.empty(s.shape[:-1] + (8,), np.uint16)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _scale_min(kind: str, raw: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, ScaleFactors | None]:
    """Per-group (rows, groups) scale and minimum of a 4-bit type's raw blocks (rows, bytes), and Q4_K's factors."""
    if kind in ("Q4_0", "Q4_1"):
        size = 18 if kind == "Q4_0" else 20
        blocks = raw.reshape(rows, -1, size)
        d = _f16(blocks[..., 0:2])
        m = -8 * d if kind == "Q4_0" else _f16(blocks[..., 2:4])
        return d, m, None
    blocks = raw.reshape(rows, -1, 144)  # Q4_K
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sc, mn = _q4k_scale_min(blocks[..., 4:16])
    scale = (d[..., None] * sc).reshape(rows, -1)
    minimum = (-dmin[..., None] * mn).reshape(rows, -1)
    factors = ScaleFactors(
        scale_steps=torch.from_numpy(sc.reshape(rows, -1).astype(np.uint8)),
        scale_units=torch.from_numpy(d.astype(np.float16)),
        minimum_steps=torch.from_numpy(mn.reshape(rows, -1).astype(np.uint8)),
        minimum_units=torch.from_numpy((-dmin).astype(np.float16)),
    )
    return scale, minimum, factors


def grouped_codes(kind: str, raw: np.ndarray, dense: np.ndarray) -> GroupedCodes:
    """The codes of a 4-bit tensor, given its raw blocks (rows, bytes) and gguf's dequantized values (rows, cols)."""
    rows, cols = dense.shape
    scale, minimum, factors = _scale_min(kind, raw, rows)
    w = dense.reshape(rows, cols // 32, 32)
    safe = np.where(scale != 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint((w - minimum[..., None]) / safe[..., None]), 0, 15)
    rebuilt = codes * scale[..., None] + minimum[..., None]
    err = np.abs(rebuilt - w).max() if w.size else 0.0
    if not err <= 1e-3 * max(float(np.abs(w).max()), 1e-6):
        raise ValueError(f"{kind} codes do not rebuild the tensor (max error {err:g})")
    return GroupedCodes(
        codes=torch.from_numpy(codes.reshape(rows, cols).astype(np.uint8)),
        scales=torch.from_numpy(scale.copy()),
        minimums=torch.from_numpy(minimum.astype(np.float32)),
        factors=factors,
    )


def q6_k_codes(raw: np.ndarray, dense: np.ndarray) -> SixBitCodes:
    """The codes of a Q6_K tensor, given its raw blocks (rows, bytes) and gguf's dequantized values (rows, cols)."""
    rows, cols = dense.shape
    blocks = raw.reshape(rows, -1, 210)
    units = _f16(blocks[..., 208:210])  # (rows, cols / 256)
    sub = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).reshape(rows, -1)  # (rows, cols / 16)
    step = (np.repeat(units, 16, axis=1) * sub.astype(np.float32))[..., None]  # exact: float16 * int8
    w = dense.reshape(rows, -1, 16)
    safe = np.where(step != 0, step, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w / safe) + 32, 0, 63)
    rebuilt = step * (codes - 32)
    err = np.abs(rebuilt - w).max() if w.size else 0.0
    if not err <= 1e-5 * max(float(np.abs(w).max()), 1e-6):
        raise ValueError(f"Q6_K codes do not rebuild the tensor (max error {err:g})")
    return SixBitCodes(codes=torch.from_numpy(codes.reshape(rows, cols).astype(np.uint8)),
                       sub_scales=torch.from_numpy(sub.copy()),
                       units=torch.from_numpy(units.astype(np.float16)))


def q8_0_codes(raw: np.ndarray, rows: int) -> BlockCodes8:
    """Q8_0 raw blocks (rows, bytes) -> int8 codes and fp16 scales, exactly."""
    blocks = raw.reshape(rows, -1, 34)
    d = _f16(blocks[..., 0:2])
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, -1)
    return BlockCodes8(codes=torch.from_numpy(codes.copy()), scales=torch.from_numpy(d.copy()))


def permute_rows(values: np.ndarray | torch.Tensor, perm: np.ndarray):
    """Rows reordered (GGUF stores llama's q/k rows in the rotary-interleaved order)."""
    return values[torch.from_numpy(perm)] if isinstance(values, torch.Tensor) else values[perm]
