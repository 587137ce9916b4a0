"""Raw GGUF blocks for tests of types the `gguf` package can read but not write."""
from __future__ import annotations

import numpy as np


def random_q6_k(rows: int, cols: int, seed: int = 0, unit: float = 4e-4) -> np.ndarray:
    """(rows, cols / 256 * 210) raw Q6_K blocks: random low and high code bits, random int8 sub-scales and a
    float16 unit of about `unit` per block (any bytes are a valid Q6_K block)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 210), dtype=np.uint8)
    blocks[..., 192:208] = rng.integers(-127, 128, size=(rows, cols // 256, 16)).astype(np.int8).view(np.uint8)
    units = rng.uniform(0.5 * unit, 1.5 * unit, size=(rows, cols // 256)).astype(np.float16)
    blocks[..., 208:210] = units.view(np.uint8).reshape(rows, cols // 256, 2)
    return blocks.reshape(rows, -1)
