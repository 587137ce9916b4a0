"""Lossless methods on the exact runtime: greedy output identical to `ar` on the same runtime, alone and as rows
of the batch engine (llama, qwen2, gemma3; int4 weights and the row-invariant attention)."""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHITECTURES, tiny_config, tiny_tokenizer
from leapdecode import Decoder
from leapdecode.batching import BatchEngine
from leapdecode.engine import _settings
from leapdecode.loading import LoadedModel
from leapdecode.runtime.convert import Weights, apply_runtime
from test_exactness import random_prompts

METHODS = ["pld", "pld-tree", "aded", "stand", "lookahead", "draft", "draft-tree"]


@functools.lru_cache(maxsize=None)
def _model(arch: str, seed: int, layers: int, weights: str):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, 64, layers), attn_implementation="sdpa").eval()
    with torch.no_grad():  # sharper distributions: repetitive, copyable greedy text
        model.get_output_embeddings().weight.mul_(6.0)
    info = apply_runtime(model, Weights(weights))
    return model, info


def runtime_loaded(arch: str, seed: int = 0, layers: int = 2, weights: str = "int4") -> LoadedModel:
    model, info = _model(arch, seed, layers, weights)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(64), name=f"tiny-{arch}-{seed}-{weights}",
                       context_length=512, runtime=info)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lossless_methods_equal_ar(arch):
    target, draft = runtime_loaded(arch), runtime_loaded(arch, seed=1, layers=1)
    assert target.runtime.exact
    ar = Decoder(target, "ar")
    prompts = random_prompts(5, n=4)
    expect = [ar.generate(p, max_new_tokens=24).token_ids for p in prompts]
    for method in METHODS:
        dec = Decoder(target, method, draft=draft if method.startswith("draft") else None)
        for prompt, ref in zip(prompts, expect):
            assert dec.generate(prompt, max_new_tokens=24).token_ids == ref, (arch, method, prompt)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batch_rows_equal_decoding_alone(arch):
    target, draft = runtime_loaded(arch), runtime_loaded(arch, seed=1, layers=1)
    engine = BatchEngine(target, {m: {} for m in ("ar", "pld", "draft", "pld-tree")}, draft=draft, max_batch_size=4)
    prompts = random_prompts(6, n=6)
    jobs = [(p, engine.submit(p, ["ar", "pld", "draft", "pld-tree"][i % 4], _settings(max_new_tokens=16)))
            for i, p in enumerate(prompts)]
    engine.run_until_done()
    ar = Decoder(target, "ar")
    for prompt, handle in jobs:
        assert handle.error is None
        assert handle.result.token_ids == ar.generate(prompt, max_new_tokens=16).token_ids


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_transformers_generate_on_the_runtime_equals_ar(arch):
    """`hf-ar` runs transformers' generate() on the same runtime after the same prompt pass: the same tokens.
    (`hf-pld`'s candidate verification is transformers' own and is compared by the bench, not here.)"""
    from leapdecode.peers import hf_generate

    target = runtime_loaded(arch)
    ar = Decoder(target, "ar")
    for prompt in random_prompts(7, n=3):
        ref = ar.generate(prompt, max_new_tokens=16).token_ids
        assert hf_generate("hf-ar", target, prompt, 16).token_ids == ref, prompt
