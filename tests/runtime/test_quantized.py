"""The quantized modules: accuracy against the dense weight, row invariance, the dequantized `weight`, the group
kernel's layout and its bits against the torch reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leapdecode.runtime import native
from leapdecode.runtime.quantized import (NO_UNIT, SPAN, BF16Linear, Int4Linear, Int6Linear, Int8GroupLinear,
                                          Int8Linear, QuantEmbedding, ScaleFactors, pack, pack6, per_block, per_row,
                                          reference_group_matmul, unpack, unpack6)


@pytest.fixture
def dense():
    g = torch.Generator().manual_seed(0)
    return torch.randn(48, 96, generator=g), torch.randn(48, generator=g)


@pytest.mark.parametrize("kind", [Int4Linear, Int8GroupLinear, Int8Linear, BF16Linear])
def test_close_to_the_dense_layer(kind, dense):
    weight, bias = dense
    module = kind(weight, bias) if kind is BF16Linear else kind.from_float(weight, bias)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    ref = x @ weight.t() + bias
    err = (module(x) - ref).abs().max() / ref.abs().max()
    assert err < {Int4Linear: 0.15, Int8GroupLinear: 0.03, Int8Linear: 0.02, BF16Linear: 0.02}[kind]
    assert module(x).dtype == torch.float32 and module(x).shape == (5, 48)


@pytest.mark.parametrize("kind", [Int4Linear, Int8GroupLinear, Int8Linear])
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
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(x @ module.weight.t(), module(x), rtol=2e-2, atol=0.3)  # int8 activations
    assert module.weight.shape == (48, 96)


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_are_kept_exactly(bits):
    """The layout round-trips, and W = code * scale + minimum with the values given."""
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 2 ** bits, (32, 64), generator=g)
    assert torch.equal(unpack(pack(codes, bits), bits), codes.to(torch.uint8))
    scales, minimums = torch.rand(32, 2, generator=g), -torch.rand(32, 2, generator=g)
    assert torch.equal(per_row(per_block(scales)), scales)
    module = (Int4Linear if bits == 4 else Int8GroupLinear)(codes, scales, minimums)
    expected = codes.float().reshape(32, 2, 32) * scales.unsqueeze(-1) + minimums.unsqueeze(-1)
    assert torch.equal(module.weight, expected.reshape(32, 64))


def _six_bit(n: int, k: int, g: torch.Generator):
    """Random 6-bit weights: codes, int8 sub-scales (the full range) and float16 units."""
    codes = torch.randint(0, 64, (n, k), generator=g)
    sub = torch.randint(-128, 128, (n, k // 16), generator=g).to(torch.int8)
    return codes, sub, (torch.rand(n, k // 256, generator=g) * 0.01).half()


def test_six_bit_layout_round_trips_and_holds_the_q6_k_formula():
    g = torch.Generator().manual_seed(8)
    codes, sub, units = _six_bit(32, 512, g)
    packed, packed_sub = pack6(codes, sub)
    assert packed.shape == (2, 16, 384) and packed_sub.shape == (2, 16, 32)
    back_codes, back_sub = unpack6(packed, packed_sub)
    assert torch.equal(back_codes, codes.to(torch.uint8)) and torch.equal(back_sub, sub)
    module = Int6Linear(codes, sub, units)
    step = units.float().repeat_interleave(16, 1) * sub.float()
    expected = step.unsqueeze(-1) * (codes.float() - 32).reshape(32, 32, 16)
    assert torch.equal(module.weight, expected.reshape(32, 512))
    shell = Int6Linear.placeholder(module.shape_record())
    assert [t.shape for t in shell.matrix()[:3]] == [t.shape for t in module.matrix()[:3]]
    assert [t.dtype for t in shell.matrix()] == [t.dtype for t in module.matrix()]
    assert not Int6Linear.supports(16, 96) and Int6Linear.supports(16, 256)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 20), blocks=st.integers(1, 2), supers=st.integers(1, 2), zero_group=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_six_bit_kernel_bits_equal_the_reference_and_rows_are_independent(rows, blocks, supers, zero_group, seed):
    """The 6-bit path of kernels/group_matmul.cpp computes exactly the reference's bits, and the Python module
    (which calls the kernel when it is built) those too; a row alone gets the bits it gets among others."""
    g = torch.Generator().manual_seed(seed)
    n, k = 16 * blocks, 256 * supers
    module = Int6Linear(*_six_bit(n, k, g))
    x = torch.randn(rows, k, generator=g) * 10 ** torch.randint(-3, 3, (rows, 1), generator=g).float()
    if zero_group:
        x[:, :32] = 0
    codes, unit, sub = module.matrix()[:3]
    expected = reference_group_matmul(x, codes, unit, sub, 6)
    assert torch.equal(module(x), expected)
    for i in range(rows):
        assert torch.equal(module(x[i:i + 1]), expected[i:i + 1])
    kernels = native.kernels()
    if kernels is not None:
        assert torch.equal(kernels.group_matmul(x, *module.matrix(), 6), expected)


def _scales(kind: str, n: int, groups: int, g: torch.Generator):
    """Kernel-layout scale, minimum and their units: float32, float16 (GGUF's own scales) or factored (Q4_K)."""
    if kind == "factored":
        units = groups // SPAN
        steps = [per_block(torch.randint(0, 64, (n, groups), generator=g), torch.uint8) for _ in range(2)]
        scale_unit = per_block(torch.rand(n, units, generator=g), torch.float16)
        minimum_unit = per_block(-torch.rand(n, units, generator=g), torch.float16)
        return steps[0], steps[1], scale_unit, minimum_unit
    dtype = torch.float16 if kind == "float16" else torch.float32
    scale = per_block(torch.rand(n, groups, generator=g), dtype)
    return scale, per_block(-torch.rand(n, groups, generator=g), dtype), NO_UNIT, NO_UNIT


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 20), blocks=st.integers(1, 3), supers=st.integers(1, 2), bits=st.sampled_from([4, 8]),
       zero_group=st.booleans(), kind=st.sampled_from(["float32", "float16", "factored"]),
       seed=st.integers(0, 2 ** 16))
def test_kernel_bits_equal_the_reference_and_rows_are_independent(rows, blocks, supers, bits, zero_group, kind,
                                                                   seed):
    """kernels/group_matmul.cpp computes exactly `reference_group_matmul`'s bits, and a row alone gets the bits
    it gets among others (every tile size of the kernel is reached: 1 to 20 rows)."""
    kernels = native.kernels()
    if kernels is None:
        pytest.skip("no C++ compiler here")
    g = torch.Generator().manual_seed(seed)
    groups = SPAN * supers if kind == "factored" else int(torch.randint(1, 5, (1,), generator=g))
    n, k = 16 * blocks, 32 * groups
    codes = pack(torch.randint(0, 2 ** bits, (n, k), generator=g), bits)
    scales = _scales(kind, n, groups, g)
    x = torch.randn(rows, k, generator=g) * 10 ** torch.randint(-3, 3, (rows, 1), generator=g).float()
    if zero_group:
        x[:, :32] = 0  # a group of zeros: scale 0, codes 0
    out = kernels.group_matmul(x, codes, *scales, bits)
    assert torch.equal(out, reference_group_matmul(x, codes, scales[0], scales[1], bits, *scales[2:]))
    for i in range(rows):
        assert torch.equal(kernels.group_matmul(x[i:i + 1].contiguous(), codes, *scales, bits), out[i:i + 1])


def test_factored_scales_give_the_bits_of_their_products():
    """Q4_K's scales held as steps and units compute exactly what the same scales held as float32 compute."""
    g = torch.Generator().manual_seed(7)
    n, groups = 32, 2 * SPAN
    codes = torch.randint(0, 16, (n, 32 * groups), generator=g)
    factors = ScaleFactors(torch.randint(0, 64, (n, groups), generator=g), torch.rand(n, 2, generator=g).half(),
                           torch.randint(0, 64, (n, groups), generator=g), -torch.rand(n, 2, generator=g).half())
    scales = factors.product(factors.scale_steps, factors.scale_units)
    minimums = factors.product(factors.minimum_steps, factors.minimum_units)
    factored = Int4Linear(codes, scales, minimums, factors=factors)
    plain = Int4Linear(codes, scales, minimums)
    assert factored.scale.dtype == torch.uint8 and plain.scale.dtype == torch.float32
    x = torch.randn(5, 32 * groups, generator=g)
    assert torch.equal(factored(x), plain(x))
    assert torch.equal(factored.weight, plain.weight)
    shell = Int4Linear.placeholder(factored.shape_record())
    assert shell.scale.dtype == torch.uint8 and shell.scale_unit.shape == factored.scale_unit.shape
    with pytest.raises(ValueError, match="do not multiply out"):
        Int4Linear(codes, scales + 1, minimums, factors=factors)


def test_scales_are_float16_when_they_are_float16_numbers():
    codes = torch.randint(0, 16, (16, 64), generator=torch.Generator().manual_seed(6))
    exact = Int4Linear(codes, torch.full((16, 2), 0.5), torch.full((16, 2), -1.0))
    assert exact.scale.dtype == torch.float16
    assert Int4Linear(codes, torch.full((16, 2), 0.1), torch.full((16, 2), -1.0)).scale.dtype == torch.float32
    assert Int4Linear.from_float(torch.randn(16, 64)).scale.dtype == torch.float16  # picked from the float16 grid
    shell = Int4Linear.placeholder(exact.shape_record())
    assert shell.scale.dtype == torch.float16 and shell.codes.shape == exact.codes.shape


def test_kernel_refuses_mismatched_shapes():
    kernels = native.kernels()
    if kernels is None:
        pytest.skip("no C++ compiler here")
    codes = pack(torch.zeros(16, 64, dtype=torch.int64), 4)
    scale = per_block(torch.ones(16, 2))
    with pytest.raises(RuntimeError, match="codes do not match"):
        kernels.group_matmul(torch.zeros(2, 96), codes, scale, scale, NO_UNIT, NO_UNIT, 4)
    six = Int6Linear(*_six_bit(16, 256, torch.Generator().manual_seed(9)))
    codes6, unit, sub = six.matrix()[:3]
    with pytest.raises(RuntimeError, match="sub-scales"):
        kernels.group_matmul(torch.zeros(2, 256), codes6, unit, sub[:, :4].contiguous(), NO_UNIT, NO_UNIT, 6)
    with pytest.raises(RuntimeError, match="bits: 4, 6 or 8"):
        kernels.group_matmul(torch.zeros(2, 96), codes, scale, scale, NO_UNIT, NO_UNIT, 5)


def test_embedding_blocks():
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-127, 128, (10, 64), generator=g).to(torch.int8)
    scales = torch.rand(10, 2, generator=g)
    emb = QuantEmbedding(codes, scales, multiplier=torch.tensor(2.0))
    ids = torch.tensor([[3, 0, 9]])
    expect = (codes.float().reshape(10, 2, 32) * scales.unsqueeze(-1)).reshape(10, 64)
    assert torch.equal(emb(ids), expect[ids] * 2.0)
    assert torch.equal(emb.weight, expect)
    # no ids at all gives no rows, as nn.Embedding does (falcon embeds an empty token list at the tree's root)
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, 64)
    assert emb(torch.zeros(1, 0, dtype=torch.long)).shape == (1, 0, 64)
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
