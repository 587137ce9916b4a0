"""How a loaded model computes: quantized weights kept quantized, and row-invariant (exact) passes.

- `convert.py`: the one seam, `apply_runtime(model, weights, gguf)`, and the `--weights` modes.
- `quantized.py`: the group-quantized (4- and 8-bit), int8-per-row and bf16 linear layers and the int8 embedding.
- `gguf_blocks.py`: a GGUF file's 4-bit and Q8_0 blocks read as they are.
- `attention.py`: the row-invariant attention registered with transformers' `AttentionInterface`.
"""
