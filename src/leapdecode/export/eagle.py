"""The EAGLE layout both engines load (vLLM `vllm/model_executor/models/llama_eagle.py`, SGLang
`python/sglang/srt/models/llama_eagle.py`): a Llama config with one (or more) decoder layers, `fc` over
cat(embedding of the next token, target hidden state) -> H, the first layer without its input norm, the
output fed to the target's LM head with no final norm and back as the next position's feature.

Our `falcon` drafter with EAGLE's layer (`layer="eagle"`, `train-drafter --kind falcon --exportable`) has that
shape: its `fuse` reads cat(feature, embedding), so `fc` is `fuse` with its two column blocks swapped, and its
layers are transformers' Llama layers under the same names. What the engines do not have is left out and
said: falcon's glance head (the engines draft every token with the layer) and its window of recent pairs (the
engines attend over the whole text; rotary positions are relative, so inside the window the outputs agree).
"""
from __future__ import annotations

import torch

from .common import Exported, ExportRefused, embedding_weight, lm_head_weight


def convert(net, drafter_config, target_model, fc_bias: bool) -> Exported:
    if drafter_config.kind == "hydra":
        raise ExportRefused("hydra's heads are sequential (head k reads the embeddings of the k tokens drafted "
                            "before it), not EAGLE's one decoder layer over feature/token pairs; it cannot be "
                            "exported")
    if drafter_config.kind != "falcon":
        raise ExportRefused(f"a {drafter_config.kind} drafter is not an EAGLE decoder layer; export medusa heads "
                            "with --format vllm-medusa (SGLang loads no Medusa heads)")
    if getattr(net, "layer_style", "falcon") != "eagle":
        raise ExportRefused("this falcon drafter uses falcon's own layer (input norm, no rotary positions, ungated "
                            "MLP), not EAGLE's Llama layer; train it with `leapdecode train-drafter --kind falcon "
                            "--exportable`")
    lm_head_weight(target_model)  # refuses an LM head with a bias
    embed = embedding_weight(target_model)
    vocab, hidden = embed.shape
    fuse = net.fuse.weight.detach().float().cpu()  # (H, 2H) over cat(feature, embedding)
    tensors = {"fc.weight": torch.cat([fuse[:, hidden:], fuse[:, :hidden]], dim=1).contiguous(),
               "embed_tokens.weight": embed}
    if fc_bias:
        tensors["fc.bias"] = torch.zeros(hidden)
    for name, value in net.layers.state_dict().items():
        tensors[f"layers.{name}"] = value.detach().float().cpu()
    lc = net.layer_config
    config = {"model_type": "llama", "hidden_size": int(hidden), "intermediate_size": int(lc.intermediate_size),
              "num_attention_heads": int(lc.num_attention_heads), "num_key_value_heads": int(lc.num_key_value_heads),
              "head_dim": int(lc.head_dim), "num_hidden_layers": len(net.layers), "rms_norm_eps": float(lc.rms_norm_eps),
              "rope_theta": float(lc.rope_parameters["rope_theta"]), "hidden_act": "silu", "vocab_size": int(vocab),
              "max_position_embeddings": int(_target_positions(target_model)), "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False}
    notes = ["falcon's glance head is left out: the engine drafts every token with the decoder layer",
             f"the engine attends over the whole text; our drafter over its last {net.window} positions"]
    return Exported(config, tensors, notes)


def _target_positions(target_model) -> int:
    from .common import target_text_config

    return getattr(target_text_config(target_model), "max_position_embeddings", 4096) or 4096
