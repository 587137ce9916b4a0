"""Tiny random-weight models (llama, qwen2, gemma3) built from configs, with a tiny word-level tokenizer."""
from __future__ import annotations

import functools

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from leapdecode.loading import LoadedModel
from leapdecode.runtime.convert import Weights, apply_runtime

ARCHITECTURES = ("llama", "qwen2", "gemma3")

# Tiny models run far faster on one thread, and do not stall when other processes load the CPUs.
torch.set_num_threads(1)


def tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    return fast


def tiny_config(arch: str, vocab_size: int = 64, layers: int = 2, sliding_window: int = 6):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma3":
        # a short sliding window so tests cross it; layer 0 sliding, layer 1 full
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=sliding_window,
                                layer_types=["sliding_attention", "full_attention"][:layers] + ["full_attention"] * (layers - 2))
    raise ValueError(arch)


@functools.lru_cache(maxsize=None)
def _model(arch: str, vocab_size: int, seed: int, layers: int, scale: float):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, layers), attn_implementation="sdpa")
    if scale != 1.0:  # sharper distributions make greedy decoding fall into repetitive, copyable patterns
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale)
    return model.eval()


def tiny_loaded(arch: str = "llama", vocab_size: int = 64, seed: int = 0, layers: int = 2, scale: float = 1.0,
                context_length: int = 512, stop_token_ids=()) -> LoadedModel:
    return LoadedModel(model=_model(arch, vocab_size, seed, layers, scale), tokenizer=tiny_tokenizer(vocab_size),
                       name=f"tiny-{arch}-{seed}", stop_token_ids=frozenset(stop_token_ids),
                       context_length=context_length)


def saved_tiny(folder, arch: str = "llama", scale: float = 1.0) -> str:
    """A tiny model and its tokenizer written to `folder` (a local model folder `load` accepts)."""
    target = tiny_loaded(arch, scale=scale)
    target.model.save_pretrained(folder)
    target.tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@functools.lru_cache(maxsize=None)
def _runtime_model(arch: str, seed: int, layers: int, weights: str):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, 64, layers), attn_implementation="sdpa").eval()
    with torch.no_grad():  # sharper distributions: repetitive, copyable greedy text
        model.get_output_embeddings().weight.mul_(6.0)
    info = apply_runtime(model, Weights(weights))
    return model, info


def runtime_loaded(arch: str, seed: int = 0, layers: int = 2, weights: str = "int4") -> LoadedModel:
    """A tiny model on the exact runtime (quantized weights, row-invariant passes), sharp enough to copy."""
    model, info = _runtime_model(arch, seed, layers, weights)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(64), name=f"tiny-{arch}-{seed}-{weights}",
                       context_length=512, runtime=info)
