"""The fused modules (runtime/fused.py, kernels/rms_norm.cpp, group_matmul.cpp's `group_mlp`): each row's output
bitwise the same alone or with other rows, close to transformers' own modules, and swapped in by `fuse` only for
the declared classes, keeping parameter names (state dicts unchanged). Whole-model invariance with the fused
modules in place: test_invariance.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from conftest import ARCHITECTURES, tiny_config

from leapdecode.runtime import fused, native
from leapdecode.runtime.convert import Weights, apply_runtime
from leapdecode.runtime.fused import Activation, FusedMLP, FusedRMSNorm
from leapdecode.runtime.quantized import Int4Linear, Int8GroupLinear

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="no C++ compiler here: nothing is fused")


def _reference_norm(x, weight, eps, offset):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight)


@settings(max_examples=30, deadline=None)
@given(width=st.sampled_from([16, 40, 64, 100, 1536]), rows=st.integers(1, 20), offset=st.sampled_from([0.0, 1.0]),
       seed=st.integers(0, 2**16))
def test_rms_norm_rows_alone_equal_rows_together(width, rows, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(rows, width, generator=g) * 3, torch.randn(width, generator=g)
    norm = FusedRMSNorm(torch.nn.Parameter(weight, requires_grad=False), 1e-6, offset)
    together = norm(x)
    for i in range(rows):
        assert torch.equal(norm(x[i:i + 1])[0], together[i])
    torch.testing.assert_close(together, _reference_norm(x, weight, 1e-6, offset), rtol=1e-5, atol=1e-5)


def _mlp(activation: Activation, seed: int, inner: int = 64, hidden: int = 96) -> FusedMLP:
    g = torch.Generator().manual_seed(seed)
    gate = Int4Linear.from_float(torch.randn(inner, hidden, generator=g))
    up = Int8GroupLinear.from_float(torch.randn(inner, hidden, generator=g))
    down = Int4Linear.from_float(torch.randn(hidden, inner, generator=g))
    return FusedMLP(gate, up, down, activation)


@settings(max_examples=20, deadline=None)
@given(activation=st.sampled_from(list(Activation)), rows=st.integers(1, 19), seed=st.integers(0, 2**16))
def test_mlp_rows_alone_equal_rows_together(activation, rows, seed):
    mlp = _mlp(activation, seed)
    x = torch.randn(1, rows, 96, generator=torch.Generator().manual_seed(seed + 1))
    together = mlp(x)
    assert together.shape == (1, rows, 96)
    for i in range(rows):
        assert torch.equal(mlp(x[:, i:i + 1])[0, 0], together[0, i])


@pytest.mark.parametrize("activation", list(Activation))
def test_mlp_close_to_the_three_linears(activation):
    mlp = _mlp(activation, 0)
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(3))
    act = F.silu if activation is Activation.SILU else (lambda t: F.gelu(t, approximate="tanh"))
    expected = mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expected, rtol=0.02, atol=0.02 * expected.abs().max().item())


def test_activation_exp_covers_large_inputs():
    """silu and gelu of large inputs (the kernel's exp clamps its argument) stay finite and near their limits."""
    mlp = _mlp(Activation.SILU, 1)
    x = torch.full((2, 96), 1e4)
    x[1] = -1e4
    assert torch.isfinite(mlp(x)).all()


def _converted(arch: str, fuse: bool, monkeypatch) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa").eval()
    with monkeypatch.context() as patch:
        if not fuse:
            patch.setattr(fused, "fuse", lambda model: {})
        info = apply_runtime(model, Weights.INT4)
    return model, info.layers


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fuse_swaps_declared_modules_and_keeps_the_state_dict(arch, monkeypatch):
    model, layers = _converted(arch, True, monkeypatch)
    plain, plain_layers = _converted(arch, False, monkeypatch)
    assert not any(type(m).__name__ in fused.NORM_KINDS or type(m).__name__ in fused.GATED_MLPS
                   for m in model.modules())
    state, plain_state = model.state_dict(), plain.state_dict()
    assert state.keys() == plain_state.keys()
    assert all(torch.equal(state[k], plain_state[k]) for k in state)
    cfg = model.config.get_text_config()
    assert layers["fused mlp"] == cfg.num_hidden_layers
    assert layers["fused rms norm"] >= 2 * cfg.num_hidden_layers + 1
    assert {k: n for k, n in layers.items() if k not in fused.FUSED_KINDS} == plain_layers
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0.05, atol=0.05)
