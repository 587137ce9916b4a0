"""Compiled passes (runtime/compiled.py): a token's logits and cache entries are bitwise equal alone, in a chain and
as a tree node, all through the compiled graphs; lossless methods equal `ar` when every pass is compiled; models
and caches the graphs cannot serve are refused in one line."""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from conftest import tiny_config, tiny_tokenizer
from leapdecode import Decoder
from leapdecode.lm import CausalLM
from leapdecode.loading import LoadedModel
from leapdecode.runtime import compiled
from leapdecode.runtime.convert import Weights, apply_runtime
from leapdecode.tree import DraftTree
from test_exactness import random_prompts
from test_invariance import _path

VOCAB = 64
COMPILED_ARCHS = ("llama", "qwen2")


@functools.lru_cache(maxsize=None)
def compiled_model(arch: str, seed: int = 0, layers: int = 2):
    """A tiny int4 model of its own (compiled passes are per model object), sharpened for copyable text."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, VOCAB, layers), attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6.0)
    info = apply_runtime(model, Weights.INT4)
    compiled.enable(model)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(VOCAB), name=f"tiny-{arch}-{seed}-compiled",
                       context_length=512, runtime=info)


@torch.inference_mode()
def _after_prompt(model, context: list[int]) -> CausalLM:
    lm = CausalLM(model)
    lm.forward(torch.tensor([context[:-1]]), prompt=True)
    return lm


tokens = st.integers(0, VOCAB - 1)


@settings(max_examples=8, deadline=None)
@given(arch=st.sampled_from(COMPILED_ARCHS), context=st.lists(tokens, min_size=2, max_size=12),
       n=st.integers(1, 6), data=st.data())
@torch.inference_mode()
def test_chain_and_tree_rows_equal_compiled_steps(arch, context, n, data):
    model = compiled_model(arch).model
    parents = [data.draw(st.integers(-1, j - 1)) for j in range(n)]
    nodes = data.draw(st.lists(tokens, min_size=n, max_size=n))
    tree = DraftTree(tokens=torch.tensor([nodes]), parents=tuple(parents))
    root = torch.tensor([[context[-1]]])

    scored = _after_prompt(model, context).score_tree(root, tree)[0]
    for node in range(n):
        steps = _after_prompt(model, context)
        rows = [steps.forward(root)[0, -1]]
        for k in _path(parents, node):
            rows.append(steps.forward(torch.tensor([[nodes[k]]]))[0, -1])
        assert torch.equal(scored[0], rows[0])
        assert torch.equal(scored[node + 1], rows[-1]), (arch, parents, node)

    chain = [nodes[k] for k in _path(parents, n - 1)]
    alone, together = _after_prompt(model, context), _after_prompt(model, context)
    for token in [context[-1]] + chain:
        alone.forward(torch.tensor([[token]]))
    together.forward(torch.tensor([[context[-1]] + chain]))
    for a, b in zip(alone.cache.layers, together.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("arch", COMPILED_ARCHS)
def test_lossless_methods_equal_ar_when_compiled(arch):
    target, draft = compiled_model(arch), compiled_model(arch, seed=1, layers=1)
    ar = Decoder(target, "ar")
    prompts = random_prompts(5, n=3)
    expect = [ar.generate(p, max_new_tokens=24).token_ids for p in prompts]
    for method in ("pld", "pld-tree", "draft"):
        dec = Decoder(target, method, draft=draft if method == "draft" else None)
        for prompt, ref in zip(prompts, expect):
            assert dec.generate(prompt, max_new_tokens=24).token_ids == ref, (arch, method, prompt)


def test_sliding_window_models_are_refused():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gemma3", VOCAB, 2), attn_implementation="sdpa").eval()
    apply_runtime(model, Weights.INT4)
    with pytest.raises(compiled.CompilationError, match="sliding-window"):
        compiled.enable(model)


def test_compressed_cache_is_refused():
    from leapdecode.kv_compress import KVSettings, make_cache_factory

    model = compiled_model("llama").model
    with pytest.raises(compiled.CompilationError, match="kv-cache"):
        CausalLM(model, cache_factory=make_cache_factory(KVSettings(kind="quant", bits=4), model))


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_trained_drafters_equal_ar_when_compiled(kind, tmp_path):
    """Drafters that read the target's hidden states take the compiled graph that returns them."""
    from test_trained_drafters import OPTIONS, fresh_drafter

    target = compiled_model("llama")
    folder = fresh_drafter(kind, target, tmp_path / kind)
    ar, dec = Decoder(target, "ar"), Decoder(target, kind, drafter=str(folder), **OPTIONS[kind])
    for prompt in random_prompts(9, n=3):
        want = ar.generate(prompt, max_new_tokens=20).token_ids
        assert dec.generate(prompt, max_new_tokens=20).token_ids == want


def test_layer_skipping_refuses_a_compiled_model():
    from leapdecode.errors import InvalidSettingError

    with pytest.raises(InvalidSettingError, match="without --compile"):
        Decoder(compiled_model("llama"), "self-spec", skip_layers="1").generate([1, 2, 3], max_new_tokens=4)


def test_a_mode_without_exact_passes_is_refused():
    from leapdecode.errors import InvalidSettingError
    from leapdecode.loading import with_compiled_passes

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB, 1), attn_implementation="sdpa").eval()
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer(VOCAB), name="tiny-fp32", context_length=512,
                         runtime=apply_runtime(model, Weights.FP32))
    with pytest.raises(InvalidSettingError, match="int4, int4-all or int8"):
        with_compiled_passes(loaded, progress=False)


def test_compile_flag_on_the_decoding_commands_only():
    from leapdecode.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "hi", "--compile"]).compile
    assert parser.parse_args(["bench", "--out", "x", "--compile"]).compile
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--compile"])


def test_loading_checks_the_compiled_passes_and_refuses_disagreeing_graphs(monkeypatch):
    from leapdecode.errors import InvalidSettingError
    from leapdecode.loading import with_compiled_passes

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB, 1), attn_implementation="sdpa").eval()
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer(VOCAB), name="tiny-probe", context_length=512,
                         runtime=apply_runtime(model, Weights.INT4))
    assert with_compiled_passes(loaded, progress=False).runtime.compiled  # the real graphs agree
    compiled.disable(model)
    monkeypatch.setattr(compiled.CompiledPasses, "warm_up", lambda self: False)  # as if they did not
    with pytest.raises(InvalidSettingError, match="not row-invariant"):
        with_compiled_passes(loaded, progress=False)
    assert compiled.passes_for(model) is None  # and the model is left eager
