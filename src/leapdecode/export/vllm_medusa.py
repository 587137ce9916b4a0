"""vLLM's Medusa layout (`--format vllm-medusa`).

vLLM (`vllm/model_executor/models/medusa.py`) builds K heads, each a stack of L residual blocks
x + silu(W x + b) (`blocks.{i}.layers.{j}`) followed by its own LM head (`lm_heads.{i}`), and reads the target's
final (post-norm) hidden state; its proposer (`vllm/v1/spec_decode/medusa.py`) drafts a chain of each head's top
token. Our medusa heads with the paper's blocks (`block="linear"`, `train-drafter --exportable`) are exactly
that, with the target's frozen LM head copied into every `lm_heads.{i}`. Our default two-layer blocks
x + W2 silu(W1 x + b1) + b2 map only where they reduce to the paper's (W2 = I and b2 = 0, or W2 = 0 and b2 = 0,
the untrained identity); otherwise the export is refused.
"""
from __future__ import annotations

import json

import torch

from .common import Exported, ExportRefused, lm_head_weight

FORMAT = "vllm-medusa"


def _linear_of(block, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) with block(x) == x + silu(W x + b) for every x, or a refusal."""
    if hasattr(block, "linear"):  # the paper's block
        return block.linear.weight.detach(), block.linear.bias.detach()
    w_out, b_out = block.out.weight.detach(), block.out.bias.detach()
    if bool((b_out == 0).all()):
        if bool((w_out == torch.eye(w_out.shape[0], dtype=w_out.dtype)).all()):
            return block.inner.weight.detach(), block.inner.bias.detach()
        if bool((w_out == 0).all()):  # an identity block
            return torch.zeros_like(block.inner.weight), torch.zeros_like(block.inner.bias)
    raise ExportRefused(f"{where} uses two-layer residual blocks (x + W2 silu(W1 x)) that vLLM's Medusa blocks "
                        "(x + silu(W x + b)) cannot hold; train it with `leapdecode train-drafter --kind medusa "
                        "--exportable`")


def convert(net, drafter_config, target_model, where: str = "the drafter") -> Exported:
    if drafter_config.kind != "medusa":
        raise ExportRefused(_not_medusa(drafter_config.kind))
    head = lm_head_weight(target_model)
    vocab, hidden = head.shape
    layers = len(net.heads[0])
    tensors: dict[str, torch.Tensor] = {}
    for i, stack in enumerate(net.heads):
        for j, block in enumerate(stack):
            w, b = _linear_of(block, where)
            tensors[f"blocks.{i}.layers.{j}.weight"] = w.float().cpu()
            tensors[f"blocks.{i}.layers.{j}.bias"] = b.float().cpu()
        tensors[f"lm_heads.{i}.weight"] = head  # vLLM gives each head its own LM head: the target's, K times
    config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": int(hidden),
              "vocab_size": int(vocab), "num_heads": int(net.num_heads), "num_hidden_layers": int(layers),
              "medusa_fc_bias": True, "truncated_vocab_size": int(vocab)}
    notes = [f"vLLM drafts a chain of {net.num_heads} tokens (each head's top token), not our tree of paths"]
    return Exported(config, tensors, notes, speculative_tokens=int(net.num_heads))


def _not_medusa(kind: str) -> str:
    if kind == "hydra":
        return ("hydra's heads are sequential (head k reads the embeddings of the k tokens drafted before it); "
                "vLLM's Medusa heads read the hidden state alone, so hydra cannot be exported")
    return f"a {kind} drafter is not a set of Medusa heads; export it with --format vllm-eagle or sglang-eagle"


def command(serve_model: str, out: str, exported: Exported) -> str:
    spec = json.dumps({"method": "medusa", "model": out, "num_speculative_tokens": exported.speculative_tokens})
    return f"vllm serve {serve_model} --speculative-config '{spec}'"
