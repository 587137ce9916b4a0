"""Small re-implementations of the engines' drafter forward passes, written from their model files, with the
engines' parameter names: a loaded export must fill every parameter and nothing else (`load_state_dict(strict)`),
so a misnamed or misshapen tensor fails. Plain torch, no transformers (our drafters use transformers' layers).

- `VllmMedusa`: vllm/model_executor/models/medusa.py (ResidualBlock: x = x + silu(layer(x)) per layer; one LM
  head per head; forward gives one hidden state per head).
- `EagleLlama`: vllm/model_executor/models/llama_eagle.py and python/sglang/srt/models/llama_eagle.py
  (fc over cat(embedding, hidden); Llama decoder layers, the first without input norm; the result is
  hidden + residual, with no final norm). vLLM's fc has no bias, SGLang's has one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


class _ResidualBlock(nn.Module):
    def __init__(self, hidden: int, layers: int, bias: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden, bias=bias) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + nn.functional.silu(layer(x))
        return x


class VllmMedusa(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        h, v = config["hidden_size"], config["vocab_size"]
        self.blocks = nn.ModuleList(_ResidualBlock(h, config["num_hidden_layers"], config.get("medusa_fc_bias", False))
                                    for _ in range(config["num_heads"]))
        self.lm_heads = nn.ModuleList(nn.Linear(h, v, bias=False) for _ in range(config["num_heads"]))

    def forward(self, hidden):  # the target's final hidden states (N, H) -> one logits tensor per head
        return [head(block(hidden)) for block, head in zip(self.blocks, self.lm_heads)]


class _RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate(x, positions, theta: float):
    """Rotary embedding, neox style (halves rotated), as the engines' Llama layers apply it. x (A, T, D)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv[None]  # (T, D/2)
    cos, sin = angles.cos().float(), angles.sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class _Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h, self.a, self.g, self.d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.theta = c["rope_theta"]
        self.q_proj = nn.Linear(h, self.a * self.d, bias=False)
        self.k_proj = nn.Linear(h, self.g * self.d, bias=False)
        self.v_proj = nn.Linear(h, self.g * self.d, bias=False)
        self.o_proj = nn.Linear(self.a * self.d, h, bias=False)

    def forward(self, x, positions):  # x (T, H), one sequence, causal
        t = x.shape[0]
        q = _rotate(self.q_proj(x).view(t, self.a, self.d).transpose(0, 1), positions, self.theta)
        k = _rotate(self.k_proj(x).view(t, self.g, self.d).transpose(0, 1), positions, self.theta)
        v = self.v_proj(x).view(t, self.g, self.d).transpose(0, 1)
        k, v = (z.repeat_interleave(self.a // self.g, dim=0) for z in (k, v))
        scores = q @ k.transpose(1, 2) / self.d ** 0.5
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        out = scores.softmax(-1) @ v  # (A, T, D)
        return self.o_proj(out.transpose(0, 1).reshape(t, self.a * self.d))


class _MLP(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h, i = c["hidden_size"], c["intermediate_size"]
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, c: dict, first: bool):
        super().__init__()
        if not first:  # the engines replace layer 0's input norm by an identity
            self.input_layernorm = _RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = _Attention(c)
        self.mlp = _MLP(c)
        self.post_attention_layernorm = _RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x, residual, positions):
        """The engines' (hidden, residual) convention: returns the MLP output and the running residual."""
        residual = x if residual is None else x + residual  # the engines' fused add-and-norm
        x = residual
        if hasattr(self, "input_layernorm"):
            x = self.input_layernorm(x)
        x = self.self_attn(x, positions)
        residual = x + residual
        return self.mlp(self.post_attention_layernorm(residual)), residual


class EagleLlama(nn.Module):
    def __init__(self, config: dict, fc_bias: bool):
        super().__init__()
        h = config["hidden_size"]
        self.embed_tokens = nn.Embedding(config["vocab_size"], h)
        self.fc = nn.Linear(2 * h, h, bias=fc_bias)
        self.layers = nn.ModuleList(_Layer(config, i == 0) for i in range(config["num_hidden_layers"]))

    def forward(self, input_ids, hidden_states, positions):
        """input_ids (T,) the tokens after each position, hidden_states (T, H) the target's features there."""
        x = self.fc(torch.cat([self.embed_tokens(input_ids), hidden_states], dim=-1))
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions)
        return x + residual


def load_engine(folder: str | Path, fmt: str) -> nn.Module:
    """The engine's drafter for an exported folder, every parameter loaded by name (strict)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if fmt == "vllm-medusa":
        assert config["model_type"] == "medusa" and config["architectures"] == ["MedusaModel"]
        module = VllmMedusa(config)
    else:
        assert config["model_type"] == "llama"
        module = EagleLlama(config, fc_bias=fmt == "sglang-eagle")
    module.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()},
                           strict=True)
    return module.eval()
