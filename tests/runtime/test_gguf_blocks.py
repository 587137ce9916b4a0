"""GGUF 4-, 6- and 8-bit blocks read as they are: codes, scales and minimums rebuild gguf's own dequantization."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from gguf_samples import random_q6_k

from leapdecode.runtime.gguf_blocks import grouped_codes, q6_k_codes, q8_0_codes
from leapdecode.runtime.quantized import Int4Linear, Int6Linear


def _random_q4_k(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    halves = np.stack([rng.uniform(0.001, 0.01, size=blocks.shape[:2]),
                       rng.uniform(0.001, 0.01, size=blocks.shape[:2])], -1).astype(np.float16)
    blocks[..., 0:4] = halves.view(np.uint8).reshape(rows, cols // 256, 4)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_codes_rebuild_the_dequantized_tensor(kind):
    rows, cols = 32, 512
    if kind == "Q4_K":
        raw = _random_q4_k(rows, cols)
    else:
        w = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32)
        raw = quantize(w, getattr(T, kind))
    dense = dequantize(raw, getattr(T, kind)).reshape(rows, cols)
    codes = grouped_codes(kind, raw, dense)
    rebuilt = codes.codes.float().reshape(rows, -1, 32) * codes.scales.unsqueeze(-1) + codes.minimums.unsqueeze(-1)
    assert np.allclose(rebuilt.reshape(rows, cols).numpy(), dense, rtol=1e-5, atol=1e-6)
    module = Int4Linear(codes.codes, codes.scales, codes.minimums)  # the same values, nothing rounded
    assert torch.equal(module.weight, rebuilt.reshape(rows, cols))
    assert (codes.factors is not None) == (kind == "Q4_K")
    if codes.factors is not None:  # held as GGUF's two factors: the same weight, 8-bit steps
        factored = Int4Linear(codes.codes, codes.scales, codes.minimums, factors=codes.factors)
        assert factored.scale.dtype == torch.uint8 and torch.equal(factored.weight, module.weight)


def test_q8_0_is_exact():
    w = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    raw = quantize(w, T.Q8_0)
    blocks = q8_0_codes(raw, 16)
    rebuilt = (blocks.codes.float().reshape(16, 2, 32) * blocks.scales.unsqueeze(-1)).reshape(16, 64)
    assert torch.equal(rebuilt, torch.from_numpy(dequantize(raw, T.Q8_0).reshape(16, 64)))


def test_wrong_dense_values_are_refused():
    w = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    raw = quantize(w, T.Q4_1)
    with pytest.raises(ValueError, match="do not rebuild"):
        grouped_codes("Q4_1", raw, w)  # the original values, not what the blocks hold


def test_q6_k_is_kept_exactly():
    """Q6_K's codes, int8 sub-scales and float16 units rebuild gguf's dequantized values bit for bit, in
    `Int6Linear` too."""
    rows, cols = 32, 512
    raw = random_q6_k(rows, cols)
    dense = dequantize(raw, T.Q6_K).reshape(rows, cols)
    six = q6_k_codes(raw, dense)
    assert six.codes.max() <= 63 and six.sub_scales.dtype == torch.int8 and six.units.shape == (rows, cols // 256)
    module = Int6Linear(six.codes, six.sub_scales, six.units)
    assert torch.equal(module.weight, torch.from_numpy(dense))
    with pytest.raises(ValueError, match="do not rebuild"):
        q6_k_codes(raw, dense + 1e-3)
