"""The quantized modules: accuracy against the dense weight, row invariance, the dequantized `weight`."""
from __future__ import annotations

import pytest
import torch

from leapdecode.runtime.quantized import BF16Linear, Int4Linear, Int8Linear, QuantEmbedding


@pytest.fixture
def dense():
    g = torch.Generator().manual_seed(0)
    return torch.randn(48, 96, generator=g), torch.randn(48, generator=g)


@pytest.mark.parametrize("kind", [Int4Linear, Int8Linear, BF16Linear])
def test_close_to_the_dense_layer(kind, dense):
    weight, bias = dense
    module = kind(weight, bias) if kind is BF16Linear else kind.from_float(weight, bias)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    ref = x @ weight.t() + bias
    err = (module(x) - ref).abs().max() / ref.abs().max()
    assert err < {Int4Linear: 0.15, Int8Linear: 0.02, BF16Linear: 0.02}[kind]
    assert module(x).dtype == torch.float32 and module(x).shape == (5, 48)


@pytest.mark.parametrize("kind", [Int4Linear, Int8Linear])
def test_rows_do_not_depend_on_their_neighbours(kind, dense):
    """A row's output is bitwise the same alone, in any prefix of a batch, and in a 3-D input."""
    module = kind.from_float(*dense)
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(2))
    full = module(x)
    for n in range(1, 17):
        assert torch.equal(module(x[:n]), full[:n])
    for i in (0, 7, 15):
        assert torch.equal(module(x[i:i + 1]), full[i:i + 1])
    assert torch.equal(module(x.reshape(2, 8, 96)).reshape(16, 48), full)


def test_weight_is_what_the_kernel_multiplies_with(dense):
    module = Int4Linear.from_float(dense[0])
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(3)).bfloat16().float()
    assert torch.allclose(x @ module.weight.t(), module(x), rtol=1e-2, atol=0.2)  # bf16 output
    assert module.weight.shape == (48, 96)


def test_int4_codes_are_kept_exactly():
    """Codes, scales and zeros exactly representable in bf16 give exactly (q - 8) * scale + zero."""
    codes = torch.randint(0, 16, (32, 64), generator=torch.Generator().manual_seed(4))
    scales = torch.full((32, 2), 0.5)
    zeros = torch.full((32, 2), -1.0)
    module = Int4Linear(codes, scales, zeros)
    assert torch.equal(module.weight, (codes.float() - 8) * 0.5 - 1.0)


def test_embedding_blocks():
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-127, 128, (10, 64), generator=g).to(torch.int8)
    scales = torch.rand(10, 2, generator=g)
    emb = QuantEmbedding(codes, scales, multiplier=torch.tensor(2.0))
    ids = torch.tensor([[3, 0, 9]])
    expect = (codes.float().reshape(10, 2, 32) * scales.unsqueeze(-1)).reshape(10, 64)
    assert torch.equal(emb(ids), expect[ids] * 2.0)
    assert torch.equal(emb.weight, expect)
    approx = QuantEmbedding.from_float(expect)
    assert (approx.weight - expect).abs().max() <= scales.max() / 2 + 1e-6


def test_fingerprint_is_the_same_for_every_weight_format():
    """A drafter or skip set made on the float32 model is found for the int4/int8 runtimes of it."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from leapdecode.drafters.checkpoint import target_fingerprint
    from leapdecode.runtime.convert import Weights, apply_runtime

    prints = set()
    for weights in Weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("llama", 64, 1)).eval()
        apply_runtime(model, weights)
        prints.add(target_fingerprint(model))
    assert len(prints) == 1
