"""Block codecs for keys and values: per-group asymmetric quantization, and GEAR (quantization + a low-rank
approximation of the quantization error + the outliers kept in float16).

A block is (batch, heads, T, head_dim). Keys are quantized per channel (each channel's entries over `group`
consecutive tokens form a group, as KIVI does: keys have outlier channels), values per token (groups of
`group` channels). Codes are stored in
the block's (T, d) order, packed into bytes (two 4-bit or four 2-bit codes a byte), so decompression is one
broadcast multiply-add per block with no transpose.

Scale and zero point of each group: with `scale_bits` = 16 in float16 (4 bytes a group); with 8 (the default)
as one byte each, relative to float16 figures kept per head and block (QLoRA's double quantization): the zero
point z on a linear grid of 256 steps between the block's smallest and largest zero point, rounded down, and
the step s on a logarithmic grid s_max * 2^(-c/16), rounded up, so the group's range is always covered and a
step is at most 4.4% coarser than needed. Every stored tensor counts in `nbytes`: the figure the bench reports
is the sum of real tensor sizes.

GEAR (Kang et al., 2024) on a block X:
  S = the entries whose removal shrinks their group's range the most (a fraction `outliers` of X), kept in
      float16 with a 16-bit index;
  D = dequant(quant(X without S)) with the range taken over the remaining entries;
  R = X - D (zero where S is), approximated per head by L = A @ B (float16) from a few steps of subspace
      (power) iteration, as GEAR computes it, near the top-`rank` singular triplets;
  X ~ D + L, with the S entries overwritten by their stored values.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch

Tensor = torch.Tensor

_ZERO_STEPS = 255  # 8-bit zero points: codes 0..255 on [z_min, z_max]
_POWER_STEPS = 6  # subspace iterations of the low-rank error term
_SCALE_STEPS = 16  # 8-bit scales: s_max * 2^(-c/16), c in 0..255 (a range of 2^-16)
# 2^(-c/16) for every code, as float32: a step is s_max * SCALE_TABLE[c], one rounding, the same in torch and in
# the C++ attention over blocks (runtime/kernels/row_attention.cpp), which takes this table
SCALE_TABLE = torch.tensor([2.0 ** (-c / _SCALE_STEPS) for c in range(256)], dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _power_start(d: int, r: int) -> Tensor:
    """The fixed (d, r) start of the subspace iteration (made once per shape)."""
    return torch.randn(d, r, generator=torch.Generator().manual_seed(0))


@dataclass
class Blocks:
    """Compressed blocks of one tensor kind (keys or values), stacked on dim 2: (batch, heads, n_blocks, ...)."""

    codes: Tensor  # (b, h, n, T*d*bits/8) uint8, in (T, d) order
    scale: Tensor  # (b, h, n, groups): float16, or uint8 codes with `meta`
    zero: Tensor  # (b, h, n, groups): float16, or uint8 codes with `meta`
    meta: Tensor | None = None  # (b, h, n, 3) float16: s_max, z_min, z_step (8-bit scales only)
    lr_a: Tensor | None = None  # (b, h, n, T, rank) float16
    lr_b: Tensor | None = None  # (b, h, n, rank, d) float16
    out_values: Tensor | None = None  # (b, h, n, k) float16
    out_index: Tensor | None = None  # (b, h, n, k) int16/int32, flat index into the block's (T, d) entries

    def _fields(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    def tensors(self) -> list[Tensor]:
        return [t for t in self._fields() if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def count(self) -> int:
        return self.codes.shape[2]

    def cat(self, other: "Blocks") -> "Blocks":
        def join(a, b):
            return None if a is None else torch.cat([a, b], dim=2)

        return Blocks(*(join(a, b) for a, b in zip(self._fields(), other._fields())))

    def nbytes_by_part(self) -> dict[str, int]:
        """Bytes of codes, scales (scale, zero, meta), low-rank factors and outliers (value and index)."""
        size = {f.name: (0 if t is None else t.numel() * t.element_size()) for f, t in zip(fields(self), self._fields())}
        return {"codes": size["codes"], "scales": size["scale"] + size["zero"] + size["meta"],
                "low_rank": size["lr_a"] + size["lr_b"], "outliers": size["out_values"] + size["out_index"]}


class BlockCodec:
    """Compress (b, h, T, d) blocks into `Blocks` and back; `kind` is "key" (per-channel groups) or "value"
    (per-token groups of `group` channels). `rank` = 0 and `outliers` = 0 give plain quantization."""

    def __init__(self, kind: str, bits: int, group: int = 64, rank: int = 0, outliers: float = 0.0,
                 scale_bits: int = 8):
        if kind not in ("key", "value"):
            raise ValueError(kind)
        if bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
        if scale_bits not in (8, 16):
            raise ValueError(f"scale_bits must be 8 or 16, got {scale_bits}")
        self.kind, self.bits, self.group, self.rank, self.outliers = kind, bits, group, rank, outliers
        self.scale_bits = scale_bits
        self.levels = (1 << bits) - 1

    # ----- layout -------------------------------------------------------------------------------------------------
    def _value_group(self, d: int) -> int:
        return self.group if d % self.group == 0 else d

    def _key_group(self, t: int) -> int:
        return self.group if t % self.group == 0 else t

    def _shape(self, t: int, d: int) -> tuple[int, int, int]:
        """A (T, d) block seen as (A, B, C) so that a group is a slice along one axis: keys (T/gk, gk, d), a
        channel's gk tokens per group (reduced over B); values (T, d/g, g), a token's g channels (over C)."""
        if self.kind == "key":
            gk = self._key_group(t)
            return t // gk, gk, d
        g = self._value_group(d)
        return t, d // g, g

    def to_groups(self, x: Tensor) -> Tensor:
        """(..., T, d) -> (..., G, m): each row a quantization group (a copy for keys)."""
        t, d = x.shape[-2:]
        a, b_, c = self._shape(t, d)
        y = x.reshape(*x.shape[:-2], a, b_, c)
        if self.kind == "key":
            y = y.transpose(-1, -2)  # (T/gk, d, gk): each channel's gk tokens a group
            return y.reshape(*x.shape[:-2], a * c, b_)
        return y.reshape(*x.shape[:-2], a * b_, c)

    def _broadcast(self, p: Tensor, t: int, d: int) -> Tensor:
        """Per-group figures (..., G) -> a shape that broadcasts against the (..., A, B, C) view of a block."""
        a, b_, c = self._shape(t, d)
        if self.kind == "key":
            return p.reshape(*p.shape[:-1], a, 1, c)
        return p.reshape(*p.shape[:-1], a, b_, 1)

    def _entries(self, x: Tensor, t: int, d: int) -> Tensor:
        return x.reshape(*x.shape[:-2], *self._shape(t, d))

    def _flat_index(self, group: Tensor, member: Tensor, t: int, d: int) -> Tensor:
        """(group, member) in the `to_groups` layout -> flat index into the block's (T, d) entries."""
        if self.kind == "key":
            gk = self._key_group(t)
            return (group // d * gk + member) * d + group % d
        return group * self._value_group(d) + member

    # ----- packing ------------------------------------------------------------------------------------------------
    def pack(self, q: Tensor) -> Tensor:
        """(..., m) uint8 codes < 2**bits -> (..., m * bits / 8) bytes, in planes: byte j holds codes j,
        j + m/p, j + 2m/p, ... (p codes a byte, the first in the low bits), so unpacking is p contiguous
        shift-and-mask passes."""
        per = 8 // self.bits
        if per == 1:
            return q
        planes = q.reshape(*q.shape[:-1], per, -1)
        out = planes[..., 0, :].clone()
        for i in range(1, per):
            out |= planes[..., i, :] << (i * self.bits)
        return out

    def unpack(self, packed: Tensor) -> Tensor:
        per = 8 // self.bits
        if per == 1:
            return packed
        planes = [packed & self.levels] + [(packed >> (i * self.bits)) & self.levels for i in range(1, per)]
        return torch.cat(planes, dim=-1)

    # ----- scales -------------------------------------------------------------------------------------------------
    def _scales(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """Group minima and maxima (b, h, G) -> (stored scale, stored zero, meta, step, zero point) with the
        step and zero point (float32) exactly those decompression rebuilds."""
        if self.scale_bits == 16:
            zero16 = lo.half()
            z = zero16.float()
            scale16 = ((hi - z) / self.levels).clamp_min(1e-8).half()
            s = scale16.float()
            # float16 rounding may leave the top of the range a hair uncovered; the clamp keeps codes valid
            return scale16, zero16, None, s, z
        z_min16 = lo.amin(-1).half()
        low = z_min16.float() > lo.amin(-1)
        z_min16 = torch.where(low, torch.nextafter(z_min16, torch.full_like(z_min16, -torch.inf)), z_min16)
        z_min = z_min16.float()
        z_step16 = ((lo.amax(-1) - z_min) / _ZERO_STEPS).clamp_min(1e-6).half()
        z_step16 = torch.where(z_step16.float() * _ZERO_STEPS < lo.amax(-1) - z_min,
                               torch.nextafter(z_step16, torch.full_like(z_step16, torch.inf)), z_step16)
        z_step = z_step16.float()
        zc = torch.floor((lo - z_min.unsqueeze(-1)) / z_step.unsqueeze(-1)).clamp_(0, _ZERO_STEPS)
        z = z_min.unsqueeze(-1) + zc * z_step.unsqueeze(-1)  # a product, then a sum: as decompression rebuilds it
        need = ((hi - z) / self.levels).clamp_min(1e-8)
        s_max16 = need.amax(-1).half()
        s_max16 = torch.where(s_max16.float() < need.amax(-1),
                              torch.nextafter(s_max16, torch.full_like(s_max16, torch.inf)), s_max16)
        s_max = s_max16.float()
        sc = torch.floor(-_SCALE_STEPS * torch.log2(need / s_max.unsqueeze(-1))).clamp_(0, 255)
        s = self._scale_value(s_max.unsqueeze(-1), sc)
        short = s < need  # the table's rounding may leave a step a hair short of the range: one code coarser
        sc = torch.where(short & (sc > 0), sc - 1, sc)
        s = self._scale_value(s_max.unsqueeze(-1), sc)
        meta = torch.stack([s_max16, z_min16, z_step16], dim=-1)
        return sc.to(torch.uint8), zc.to(torch.uint8), meta, s, z

    @staticmethod
    def _scale_value(s_max: Tensor, code: Tensor) -> Tensor:
        return s_max * SCALE_TABLE.to(s_max.device)[code.long()]

    def _step_and_zero(self, blocks: Blocks, n: int) -> tuple[Tensor, Tensor]:
        """(b, h, n, G) float32 step and zero point of the first `n` blocks."""
        if blocks.meta is None:
            return blocks.scale[:, :, :n].float(), blocks.zero[:, :, :n].float()
        meta = blocks.meta[:, :, :n].float()
        s = self._scale_value(meta[..., 0:1], blocks.scale[:, :, :n])
        z = meta[..., 1:2] + blocks.zero[:, :, :n].float() * meta[..., 2:3]
        return s, z

    # ----- compress -----------------------------------------------------------------------------------------------
    def _outliers(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """The entries kept apart, in the `to_groups` layout: (group, member) indices (b, h, k), and each group's
        smallest and largest entry among the others (b, h, G). Per group, the largest and the smallest entry are
        candidates, scored by how much removing them shrinks the group's squared range."""
        b, h, groups, m = y.shape
        k = min(round(self.outliers * groups * m), 2 * groups)
        if k <= 0 or m < 3:
            return None
        hi, hi_at = y.max(-1)  # the two largest and the two smallest of each group (max/min: topk is slow here)
        lo, lo_at = y.min(-1)
        hi2 = y.scatter(-1, hi_at.unsqueeze(-1), -torch.inf).amax(-1)
        lo2 = y.scatter(-1, lo_at.unsqueeze(-1), torch.inf).amin(-1)
        span = (hi - lo) ** 2
        gains = torch.cat([span - (hi2 - lo) ** 2, span - (hi - lo2) ** 2], dim=-1)  # (b, h, 2G)
        member = torch.cat([hi_at, lo_at], dim=-1)
        group = torch.arange(groups, device=y.device).repeat(2).expand_as(member)
        chosen = gains.topk(k, dim=-1).indices
        taken = torch.zeros_like(gains, dtype=torch.bool).scatter_(-1, chosen, True)
        lo = torch.where(taken[..., groups:], lo2, lo)  # m >= 3: the second extreme is another entry
        hi = torch.where(taken[..., :groups], hi2, hi)
        return group.gather(-1, chosen), member.gather(-1, chosen), lo, hi

    def compress(self, x: Tensor) -> Blocks:
        """One block (b, h, T, d) -> Blocks with n = 1."""
        b, h, t, d = x.shape
        xf = x.float()
        y = self.to_groups(xf)  # (b, h, G, m)
        groups, m = y.shape[-2], y.shape[-1]
        picked = self._outliers(y) if self.outliers > 0 else None
        if picked is not None:
            group, member, lo, hi = picked
            index = self._flat_index(group, member, t, d).sort(dim=-1).values
        else:
            lo, hi = y.amin(-1), y.amax(-1)
            index = None
        scale, zero, meta, s, z = self._scales(lo, hi)
        s_b, z_b = self._broadcast(s, t, d), self._broadcast(z, t, d)
        q = torch.round((self._entries(xf, t, d) - z_b) / s_b).clamp_(0, self.levels)
        codes = self.pack(q.to(torch.uint8).reshape(b, h, t * d))
        blocks = Blocks(codes.unsqueeze(2), scale.unsqueeze(2), zero.unsqueeze(2),
                        None if meta is None else meta.unsqueeze(2))
        if index is not None:
            values = xf.reshape(b, h, t * d).gather(-1, index).half()
            blocks.out_values = values.unsqueeze(2)
            blocks.out_index = index.to(torch.int16 if t * d <= 32767 else torch.int32).unsqueeze(2)
        if self.rank > 0:
            residual = xf - (q * s_b + z_b).reshape(b, h, t, d)
            if index is not None:
                residual = residual.reshape(b, h, t * d).scatter(-1, index, 0.0).reshape(b, h, t, d)
            a, b_ = self._low_rank(residual)
            blocks.lr_a = a.half().unsqueeze(2)
            blocks.lr_b = b_.half().unsqueeze(2)
        return blocks

    def _low_rank(self, residual: Tensor) -> tuple[Tensor, Tensor]:
        """A rank-`rank` approximation A @ B of each (T, d) residual by subspace iteration on R^T R, as GEAR
        computes it (power iteration, cheaper than an SVD for a rank of 2-4): B = an orthonormal basis V^T of
        the dominant right singular subspace, A = R V, from a fixed start (the same blocks give the same
        factors)."""
        t, d = residual.shape[-2:]
        r = min(self.rank, t, d)
        gram = residual.transpose(-1, -2) @ residual  # (..., d, d)
        v = _power_start(d, r).to(residual).expand(*gram.shape[:-2], d, r)
        for _ in range(_POWER_STEPS):
            v, _ = torch.linalg.qr(gram @ v)
        return residual @ v, v.transpose(-1, -2)

    # ----- decompress ---------------------------------------------------------------------------------------------
    def decompress(self, blocks: Blocks, t: int, d: int, dtype: torch.dtype, count: int | None = None,
                   out: Tensor | None = None) -> Tensor:
        """The first `count` blocks (default all) -> (b, h, count*T, d) in `dtype`; written into `out` (a
        float32 (b, h, count*T, d) tensor, possibly a slice of a larger one) when given."""
        n = blocks.count if count is None else count
        b, h = blocks.codes.shape[:2]
        q = self.unpack(blocks.codes[:, :, :n])  # (b, h, n, T*d) uint8
        s, z = self._step_and_zero(blocks, n)
        shape = (b, h, n, *self._shape(t, d))
        target = out.view(b, h, n, t, d).view(shape) if out is not None and dtype == torch.float32 else None
        # (mixed-dtype broadcasting into a fresh tensor is slow on CPU: convert first, then scale in place)
        if target is not None:
            y = torch.mul(q.view(shape), self._broadcast(s, t, d), out=target)
        else:
            y = q.view(shape).to(torch.float32).mul_(self._broadcast(s, t, d))
        y = y.add_(self._broadcast(z, t, d)).view(b, h, n, t, d)
        if blocks.lr_a is not None:  # the low-rank error term, one outer product per rank (elementwise, so a
            a, bb = blocks.lr_a[:, :, :n].float(), blocks.lr_b[:, :, :n].float()  # block's values do not depend
            for i in range(a.shape[-1]):  # on how many blocks are decompressed together; a product, then a sum)
                y.add_(a[..., i:i + 1] * bb[..., i:i + 1, :])
        if blocks.out_index is not None:  # the outliers: written over everything else
            y.view(b, h, n, t * d).scatter_(-1, blocks.out_index[:, :, :n].long(), blocks.out_values[:, :, :n].float())
        y = y.view(b, h, n * t, d)
        if out is not None and target is None:
            out.copy_(y)
            return out
        return y if target is not None else y.to(dtype)

    def compress_blocks(self, x: Tensor, t: int) -> Blocks:
        """(b, h, n * t, d) -> Blocks of n blocks of t tokens, in one call (each block compressed as alone)."""
        b, h, length, d = x.shape
        n = length // t
        one = self.compress(x.reshape(b, h * n, t, d))
        return Blocks(*(None if f is None else f.reshape(b, h, n, *f.shape[3:]).contiguous() for f in one._fields()))

    def layout(self) -> list[int]:
        """What the C++ attention over blocks needs to read them: bits, 0 keys / 1 values, group."""
        return [self.bits, 0 if self.kind == "key" else 1, self.group]

    def round_trip(self, x: Tensor) -> Tensor:
        b, h, t, d = x.shape
        return self.decompress(self.compress(x), t, d, x.dtype)
