"""Fused modules of the exact runtime: an RMS norm, and a gated MLP, each one C++ call instead of many small ops.

In an eager one-token pass of a 1.5B model on a CPU, a quarter of the time goes to framework overhead: each RMS
norm is eight small ops (dtype conversions, pow, mean, rsqrt, multiplies), each MLP three module calls and an
activation between them. `fuse(model)` swaps those modules, at the same seam as the quantized linears
(`convert.apply_runtime`, and `stored.load` for a stored conversion), for modules that make one call into
kernels/rms_norm.cpp and kernels/group_matmul.cpp's `group_mlp`:

| module class (declared below) | becomes | computes |
| --- | --- | --- |
| (`NORM_KINDS`) `LlamaRMSNorm`, `Qwen2RMSNorm`, `Qwen3RMSNorm`, `MistralRMSNorm` | `FusedRMSNorm` | `(x * r) * w`, r = 1/sqrt(mean(x^2) + eps) |
| `Gemma3RMSNorm` | `FusedRMSNorm` | `(x * r) * (1 + w)` |
| (`GATED_MLPS`) `LlamaMLP`, `Qwen2MLP`, `Qwen3MLP`, `MistralMLP`, `Gemma3MLP` with `GroupLinear` projections and no bias | `FusedMLP` | `down(act(gate(x)) * up(x))`, act silu or gelu (tanh) |

The fused modules keep their parameters and children under the same names (`weight`; `gate_proj`, `up_proj`,
`down_proj`), so state dicts, stored conversions and code that reaches into a layer see what they saw before.
Every fused computation is a fixed sequence of float32 operations per row, so passes stay row-invariant (the
property tests of tests/runtime/test_invariance.py cover them); the bits differ from transformers' modules, which
is why the swap happens in the exact modes only, and only where the C++ kernels are built (without them nothing
is fused; a fused module whose process turns the kernels off later computes the same formula with torch ops).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUTanh, SiLUActivation

from . import native
from .quantized import GroupLinear



@dataclass(frozen=True)
class NormKind:
    """An RMS norm class whose forward is (x * r) * (offset + weight) in float32: its offset, and the attribute
    holding its epsilon."""

    offset: float
    eps_attribute: str


NORM_KINDS = {"LlamaRMSNorm": NormKind(0.0, "variance_epsilon"), "Qwen2RMSNorm": NormKind(0.0, "variance_epsilon"),
              "Qwen3RMSNorm": NormKind(0.0, "variance_epsilon"), "MistralRMSNorm": NormKind(0.0, "variance_epsilon"),
              "Gemma3RMSNorm": NormKind(1.0, "eps")}
# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x))
GATED_MLPS = frozenset({"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "Gemma3MLP"})


class Activation(IntEnum):
    """The activations `group_mlp` computes (its `activation` argument)."""

    SILU = 0
    GELU_TANH = 1


_ACTIVATIONS = {SiLUActivation: Activation.SILU, nn.SiLU: Activation.SILU, GELUTanh: Activation.GELU_TANH}


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return native.kernels().rms_norm(x, weight, eps)


def _group_mlp(x, gate, up, down, bits, activation):
    return native.kernels().group_mlp(x, gate, up, down, bits, activation)


# Opaque ops for compiled graphs (the eager path calls the kernels directly, without the dispatcher).
_LIBRARY = torch.library.Library("leapdecode", "FRAGMENT")
_LIBRARY.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_LIBRARY.impl("rms_norm", _rms_norm, "CompositeExplicitAutograd")
torch.library.register_fake("leapdecode::rms_norm", lambda x, weight, eps: torch.empty_like(x), lib=_LIBRARY)
_LIBRARY.define("group_mlp(Tensor x, Tensor[] gate, Tensor[] up, Tensor[] down, int[] bits, int activation) -> Tensor")
_LIBRARY.impl("group_mlp", _group_mlp, "CompositeExplicitAutograd")
torch.library.register_fake("leapdecode::group_mlp",
                            lambda x, gate, up, down, bits, activation: x.new_empty(x.shape[0], down[0].shape[0] * 16),
                            lib=_LIBRARY)


class FusedRMSNorm(nn.Module):
    """An RMS norm over the last dimension in one C++ call (float32 in and out)."""

    def __init__(self, weight: nn.Parameter, eps: float, offset: float):
        super().__init__()
        self.weight = weight  # the module's own parameter, under its own name
        self.eps, self.offset = float(eps), float(offset)
        with torch.no_grad():  # offset + weight, once (not in the state dict: the weight is)
            scale = weight.detach().float()
            self.register_buffer("scale", (scale + offset if offset else scale).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.leapdecode.rms_norm(x.contiguous(), self.scale, self.eps)
        kernels = native.kernels()
        if kernels is None:  # the Python routines serve (the kernels turned off after the swap)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale
        return kernels.rms_norm(x.contiguous(), self.scale, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}"


class FusedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)) over three `GroupLinear`s in one C++ call."""

    def __init__(self, gate_proj: GroupLinear, up_proj: GroupLinear, down_proj: GroupLinear, activation: Activation):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()  # (native.kernels() takes a lock: not inside a graph)
        kernels = None if compiling else native.kernels()
        if kernels is None and not compiling:  # the Python routines serve (the kernels turned off after the swap)
            gate = self.gate_proj(x)
            act = F.silu(gate) if self.activation is Activation.SILU else F.gelu(gate, approximate="tanh")
            return self.down_proj(act * self.up_proj(x))
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float().contiguous()
        args = (rows, self.gate_proj.matrix(), self.up_proj.matrix(), self.down_proj.matrix(),
                [self.gate_proj.BITS, self.up_proj.BITS, self.down_proj.BITS], int(self.activation))
        y = torch.ops.leapdecode.group_mlp(*args) if compiling else kernels.group_mlp(*args)
        return y.to(x.dtype).reshape(*shape[:-1], self.down_proj.out_features)

    def extra_repr(self) -> str:
        return f"activation={self.activation.name.lower()}"


def _fused_norm(module: nn.Module) -> FusedRMSNorm | None:
    kind = NORM_KINDS.get(type(module).__name__)
    if kind is None or module.weight.dtype != torch.float32:
        return None
    return FusedRMSNorm(module.weight, getattr(module, kind.eps_attribute), kind.offset)


def _fused_mlp(module: nn.Module) -> FusedMLP | None:
    if type(module).__name__ not in GATED_MLPS:
        return None
    activation = _ACTIVATIONS.get(type(module.act_fn))
    projections = (module.gate_proj, module.up_proj, module.down_proj)
    if activation is None or not all(isinstance(p, GroupLinear) and p.bias is None for p in projections):
        return None
    return FusedMLP(*projections, activation)


FUSED_KINDS = ("fused rms norm", "fused mlp")  # their names in `RuntimeInfo.layers`


def fuse(model: nn.Module) -> dict[str, int]:
    """Swap the model's RMS norms and gated MLPs for fused modules in place (nothing without the C++ kernels);
    returns how many of each kind were swapped, for `RuntimeInfo.layers`."""
    if native.kernels() is None:
        return {}
    counts = dict.fromkeys(FUSED_KINDS, 0)
    for name, module in list(model.named_modules()):
        fused = _fused_norm(module)
        kind = FUSED_KINDS[0]
        if fused is None:
            fused, kind = _fused_mlp(module), FUSED_KINDS[1]
        if fused is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fused)
        counts[kind] += 1
    return {k: n for k, n in counts.items() if n}
