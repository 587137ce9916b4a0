"""Lossless methods on the exact runtime: greedy output identical to `ar` on the same runtime, alone and as rows
of the batch engine (llama, qwen2, gemma3; int4 weights and the row-invariant attention)."""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES, runtime_loaded
from leapdecode import Decoder
from leapdecode.batching import BatchEngine
from leapdecode.engine import _settings
from test_exactness import random_prompts

METHODS = ["pld", "pld-tree", "aded", "stand", "lookahead", "draft", "draft-tree"]


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
