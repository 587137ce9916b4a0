"""Block codecs for keys and values: per-group asymmetric quantization, and GEAR (quantization + a low-rank
approximation of the quantization error + the outliers kept exactly).

A block is (batch, heads, T, head_dim). Keys are quantized per channel (each channel's T entries form a group,
as KIVI does: keys have outlier channels), values per token (groups of `group` channels). Codes are packed
into bytes (2, 4 or 8 bits); scales and zero points are stored in float16. Every stored tensor counts in
`nbytes`: the figure the bench reports is the sum of real tensor sizes.

GEAR (Kang et al., 2024) on a block X:
  S = the entries whose removal shrinks their group's range the most (a fraction `outliers` of X), kept exactly;
  D = dequant(quant(X without S)) with the range taken over the remaining entries;
  R = X - D (zero where S is), approximated per head by its top-`rank` singular triplets L = A @ B;
  X ~ D + L, with the S entries overwritten by their exact values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class Blocks:
    """Compressed blocks of one tensor kind (keys or values), stacked on dim 2: (batch, heads, n_blocks, ...)."""

    codes: Tensor  # (b, h, n, T*d*bits/8) uint8
    scale: Tensor  # (b, h, n, groups) float16
    zero: Tensor  # (b, h, n, groups) float16
    lr_a: Tensor | None = None  # (b, h, n, T, rank) float16
    lr_b: Tensor | None = None  # (b, h, n, rank, d) float16
    out_values: Tensor | None = None  # (b, h, n, k) in the cache's dtype (exact)
    out_index: Tensor | None = None  # (b, h, n, k) int16/int32, flat index into the block's group view

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.codes, self.scale, self.zero, self.lr_a, self.lr_b, self.out_values, self.out_index)
                if t is not None]

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

    def _fields(self):
        return (self.codes, self.scale, self.zero, self.lr_a, self.lr_b, self.out_values, self.out_index)


class BlockCodec:
    """Compress (b, h, T, d) blocks into `Blocks` and back; `kind` is "key" (per-channel groups) or "value"
    (per-token groups of `group` channels). `rank` = 0 and `outliers` = 0 give plain quantization."""

    def __init__(self, kind: str, bits: int, group: int = 64, rank: int = 0, outliers: float = 0.0):
        if kind not in ("key", "value"):
            raise ValueError(kind)
        if bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
        self.kind, self.bits, self.group, self.rank, self.outliers = kind, bits, group, rank, outliers
        self.levels = (1 << bits) - 1

    # ----- layout: a block as groups (b, h, G, n), quantized over the last dim --------------------------------
    def _value_group(self, d: int) -> int:
        return self.group if d % self.group == 0 else d

    def to_groups(self, x: Tensor) -> Tensor:
        b, h, t, d = x.shape
        if self.kind == "key":
            return x.transpose(-1, -2)  # (b, h, d, T): each channel a group
        g = self._value_group(d)
        return x.reshape(b, h, t * d // g, g)

    def from_groups(self, y: Tensor, t: int, d: int) -> Tensor:
        """Inverse of `to_groups`; `y` may carry an extra block dim: (b, h, n, G, m) -> (b, h, n, T, d)."""
        if self.kind == "key":
            return y.transpose(-1, -2)
        return y.reshape(*y.shape[:-2], t, d)

    # ----- packing --------------------------------------------------------------------------------------------
    def pack(self, q: Tensor) -> Tensor:
        """(..., m) uint8 codes < 2**bits -> (..., m * bits / 8) bytes."""
        per = 8 // self.bits
        if per == 1:
            return q
        q = q.reshape(*q.shape[:-1], -1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32, device=q.device) * self.bits
        return (q << shifts).sum(-1).to(torch.uint8)

    def unpack(self, packed: Tensor) -> Tensor:
        per = 8 // self.bits
        if per == 1:
            return packed
        shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * self.bits
        q = (packed.unsqueeze(-1) >> shifts) & self.levels
        return q.reshape(*packed.shape[:-1], -1)

    # ----- compress ---------------------------------------------------------------------------------------------
    def _outlier_index(self, y: Tensor) -> Tensor | None:
        """Flat indices (b, h, k) into the group view of the entries kept exactly: per group, the largest and the
        smallest entry are candidates, scored by how much removing them shrinks the group's squared range."""
        b, h, groups, m = y.shape
        k = min(round(self.outliers * groups * m), 2 * groups)
        if k <= 0 or m < 3:
            return None
        top = y.topk(2, dim=-1)
        bottom = (-y).topk(2, dim=-1)
        hi, hi2, lo, lo2 = top.values[..., 0], top.values[..., 1], -bottom.values[..., 0], -bottom.values[..., 1]
        span = (hi - lo) ** 2
        gains = torch.cat([span - (hi2 - lo) ** 2, span - (hi - lo2) ** 2], dim=-1)  # (b, h, 2G)
        base = torch.arange(groups, device=y.device) * m
        flat = torch.cat([base + top.indices[..., 0], base + bottom.indices[..., 0]], dim=-1)
        chosen = gains.topk(k, dim=-1).indices
        return flat.gather(-1, chosen).sort(dim=-1).values

    def compress(self, x: Tensor) -> Blocks:
        """One block (b, h, T, d) -> Blocks with n = 1."""
        b, h, t, d = x.shape
        xf = x.float()
        y = self.to_groups(xf)
        groups, m = y.shape[-2], y.shape[-1]
        index = self._outlier_index(y) if self.outliers > 0 else None
        if index is not None:
            mask = torch.zeros(b, h, groups * m, dtype=torch.bool, device=x.device)
            mask.scatter_(-1, index, True)
            mask = mask.view(b, h, groups, m)
            lo = torch.where(mask, torch.inf, y).amin(-1)
            hi = torch.where(mask, -torch.inf, y).amax(-1)
        else:
            mask = None
            lo, hi = y.amin(-1), y.amax(-1)
        scale = ((hi - lo) / self.levels).clamp_min(1e-8).half()
        zero = lo.half()
        s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
        q = torch.round((y - z) / s).clamp_(0, self.levels).to(torch.uint8)
        codes = self.pack(q.reshape(b, h, groups * m))
        blocks = Blocks(codes.unsqueeze(2), scale.unsqueeze(2), zero.unsqueeze(2))
        if index is not None:
            values = self.to_groups(x).reshape(b, h, groups * m).gather(-1, index)
            blocks.out_values = values.unsqueeze(2)
            blocks.out_index = index.to(torch.int16 if groups * m <= 32767 else torch.int32).unsqueeze(2)
        if self.rank > 0:
            residual = y - (q.float() * s + z)
            if mask is not None:
                residual = residual.masked_fill(mask, 0.0)
            residual = self.from_groups(residual, t, d)  # (b, h, T, d)
            u, sv, vh = torch.linalg.svd(residual, full_matrices=False)
            r = min(self.rank, sv.shape[-1])
            blocks.lr_a = (u[..., :r] * sv[..., None, :r]).half().unsqueeze(2)
            blocks.lr_b = vh[..., :r, :].half().unsqueeze(2)
        return blocks

    # ----- decompress -------------------------------------------------------------------------------------------
    def decompress(self, blocks: Blocks, t: int, d: int, dtype: torch.dtype, count: int | None = None) -> Tensor:
        """The first `count` blocks (default all) -> (b, h, count*T, d) in `dtype`."""
        n = blocks.count if count is None else count
        codes = blocks.codes[:, :, :n]
        b, h = codes.shape[:2]
        q = self.unpack(codes).float()  # (b, h, n, G*m)
        groups = blocks.scale.shape[-1]
        y = q.view(b, h, n, groups, -1) * blocks.scale[:, :, :n].float().unsqueeze(-1) \
            + blocks.zero[:, :, :n].float().unsqueeze(-1)
        if blocks.lr_a is not None:  # the low-rank error term, brought to the group layout
            low = blocks.lr_a[:, :, :n].float() @ blocks.lr_b[:, :, :n].float()  # (b, h, n, T, d)
            y = y + (low.transpose(-1, -2) if self.kind == "key" else low.reshape(y.shape))
        if blocks.out_index is not None:  # the outliers are exact: written over everything else
            flat = y.reshape(b, h, n, -1)
            flat.scatter_(-1, blocks.out_index[:, :, :n].long(), blocks.out_values[:, :, :n].float())
            y = flat.view(b, h, n, groups, -1)
        x = self.from_groups(y, t, d)  # (b, h, n, T, d)
        return x.reshape(b, h, n * t, d).to(dtype)

    def round_trip(self, x: Tensor) -> Tensor:
        b, h, t, d = x.shape
        return self.decompress(self.compress(x), t, d, x.dtype)
