"""How a loaded model computes: quantized weights kept quantized, and row-invariant (exact) passes.

- `convert.py`: the one seam, `apply_runtime(model, weights, gguf)`, and the `--weights` modes.
- `quantized.py`: the int4/int8/bf16 linear layers and the int8 embedding on torch's CPU kernels.
- `gguf_blocks.py`: a GGUF file's 4-bit and Q8_0 blocks read as they are.
- `attention.py`: the row-invariant attention registered with transformers' `AttentionInterface`.
"""
