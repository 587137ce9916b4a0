"""Batch invariance of the exact runtime: a token's logits, and the keys and values it leaves in the cache, are
bitwise equal (`torch.equal`) whether it is fed alone (sequential decoding), in a chain, as a tree node or as one
row of a ragged batch. Property tests over random prompts, chains, trees and batches on llama, qwen2 and gemma3
(whose tiny config has a 6-token sliding window, crossed here), for every mode that claims exactness."""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, DynamicCache

from conftest import ARCHITECTURES, tiny_config
from leapdecode.masks import attention_masks
from leapdecode.runtime import native
from leapdecode.runtime.convert import Weights, apply_runtime

VOCAB = 64
EXACT_MODES = [w.value for w in Weights if w.exact]


@pytest.fixture(autouse=True, scope="module", params=["kernel", "python"])
def attention_routine(request):
    """Every test twice: with the C++ kernel, and with the Python routine that serves where it cannot be built."""
    kernels = native.kernels()
    if request.param == "kernel" and kernels is None:
        pytest.skip("the C++ kernel could not be built here")
    native._STATE["module"] = kernels if request.param == "kernel" else None
    yield request.param
    native._STATE["module"] = kernels


@functools.lru_cache(maxsize=None)
def runtime_model(arch: str, weights: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, VOCAB, 2), attn_implementation="sdpa").eval()
    apply_runtime(model, Weights(weights))
    return model


def _window(model):
    cfg = model.config
    return cfg.sliding_window if "sliding_attention" in (getattr(cfg, "layer_types", None) or []) else None


def _masks(model, past_valid, block, positions):
    masks = attention_masks(past_valid, block, positions, _window(model))
    return masks if len(masks) > 1 else masks["full_attention"]


@torch.inference_mode()
def _prefilled(model, context: list[int]) -> DynamicCache:
    cache = DynamicCache()
    model(input_ids=torch.tensor([context[:-1]]), cache=cache, use_cache=True)
    return cache


@torch.inference_mode()
def _sequential(model, context: list[int], path: list[int]) -> list[torch.Tensor]:
    """Logits (V,) after the root and after each token of `path`, each token fed alone."""
    cache = _prefilled(model, context)
    rows = []
    for token in [context[-1]] + path:
        rows.append(model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1])
    return rows, cache


def _path(parents: list[int], node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(node)
        node = parents[node]
    return out[::-1]


tokens = st.integers(0, VOCAB - 1)


@st.composite
def trees(draw):
    n = draw(st.integers(1, 7))
    parents = [draw(st.integers(-1, j - 1)) for j in range(n)]
    return parents, draw(st.lists(tokens, min_size=n, max_size=n))


@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(ARCHITECTURES), weights=st.sampled_from(EXACT_MODES),
       context=st.lists(tokens, min_size=2, max_size=14), chain=st.lists(tokens, min_size=1, max_size=9))
def test_chain_rows_equal_sequential_decoding(arch, weights, context, chain):
    model = runtime_model(arch, weights)
    expect, seq_cache = _sequential(model, context, chain)
    cache = _prefilled(model, context)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[context[-1]] + chain]), cache=cache, use_cache=True).logits[0]
    for i, row in enumerate(expect):
        assert torch.equal(logits[i], row), f"row {i} of the chain differs from sequential decoding"
    for layer_a, layer_b in zip(cache.layers, seq_cache.layers):  # the same keys and values in the cache
        assert torch.equal(layer_a.keys, layer_b.keys) and torch.equal(layer_a.values, layer_b.values)


@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(ARCHITECTURES), weights=st.sampled_from(EXACT_MODES),
       context=st.lists(tokens, min_size=2, max_size=14), tree=trees())
def test_tree_nodes_equal_sequential_decoding(arch, weights, context, tree):
    parents, node_tokens = tree
    model = runtime_model(arch, weights)
    n, past = len(parents), len(context) - 1
    block = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    depth = [0] * (n + 1)
    block[:, 0] = True
    for j in range(n):
        for a in _path(parents, j):
            block[j + 1, a + 1] = True
        depth[j + 1] = len(_path(parents, j))
    positions = torch.tensor([[past + d for d in depth]])
    cache = _prefilled(model, context)
    masks = _masks(model, torch.ones(1, past, dtype=torch.bool), block.unsqueeze(0), positions)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[context[-1]] + node_tokens]), position_ids=positions,
                       attention_mask=masks, cache=cache, use_cache=True).logits[0]
    root_only, _ = _sequential(model, context, [])
    assert torch.equal(logits[0], root_only[0])
    for j in range(n):
        path = [node_tokens[a] for a in _path(parents, j)]
        expect, _ = _sequential(model, context, path)
        assert torch.equal(logits[j + 1], expect[-1]), f"tree node {j} differs from sequential decoding"


@settings(max_examples=10, deadline=None)
@given(arch=st.sampled_from(ARCHITECTURES), weights=st.sampled_from(EXACT_MODES),
       contexts=st.lists(st.lists(tokens, min_size=2, max_size=12), min_size=2, max_size=3),
       drafts=st.lists(st.lists(tokens, min_size=0, max_size=4), min_size=3, max_size=3))
def test_ragged_batch_rows_equal_their_own_decoding(arch, weights, contexts, drafts):
    """Rows of different lengths, left-padded into one cache, each with its own chain of drafts."""
    model = runtime_model(arch, weights)
    batch = len(contexts)
    width = max(len(c) - 1 for c in contexts)
    ids = torch.zeros(batch, width, dtype=torch.long)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    for b, c in enumerate(contexts):
        lead = c[:-1]
        ids[b, width - len(lead):] = torch.tensor(lead)
        valid[b, width - len(lead):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    block = torch.eye(width, dtype=torch.bool).unsqueeze(0) | (torch.ones(width, width, dtype=torch.bool).tril()
                                                                 & valid.unsqueeze(1))
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True,
              attention_mask=_masks(model, torch.zeros(batch, 0, dtype=torch.bool), block, positions))
    q = 1 + max(len(d) for d in drafts[:batch])
    step = torch.zeros(batch, q, dtype=torch.long)
    step_block = torch.zeros(batch, q, q, dtype=torch.bool)
    for b in range(batch):
        row = [contexts[b][-1]] + drafts[b]
        step[b, :len(row)] = torch.tensor(row)
        step_block[b] = torch.eye(q, dtype=torch.bool)
        step_block[b, :len(row), :len(row)] = torch.ones(len(row), len(row), dtype=torch.bool).tril()
    step_pos = valid.long().sum(1, keepdim=True) + torch.arange(q)
    with torch.inference_mode():
        logits = model(input_ids=step, position_ids=step_pos, cache=cache, use_cache=True,
                       attention_mask=_masks(model, valid, step_block, step_pos)).logits
    for b in range(batch):
        expect, _ = _sequential(model, contexts[b], drafts[b])
        for i, row in enumerate(expect):
            assert torch.equal(logits[b, i], row), f"batch row {b}, token {i} differs from its own decoding"


def test_growing_cache_equals_concatenation():
    """The in-place cache (kv_cache.new_cache) gives the same logits and entries as transformers' DynamicCache,
    through appends, crops and a tree compaction."""
    from leapdecode import kv_cache

    model = runtime_model("qwen2", "int4")
    ours, theirs = kv_cache.new_cache(), DynamicCache()
    steps = [[3, 4, 5, 6, 7, 8], [9], [10, 11, 12], [13]]
    with torch.inference_mode():
        for i, chunk in enumerate(steps * 80):  # past the first buffer's capacity
            ids = torch.tensor([chunk])
            a = model(input_ids=ids, cache=ours, use_cache=True).logits
            b = model(input_ids=ids, cache=theirs, use_cache=True).logits
            assert torch.equal(a, b)
            if i % 4 == 2:
                length = kv_cache.cache_length(ours) - 2
                kv_cache.crop(ours, length)
                kv_cache.crop(theirs, length)
            if i % 7 == 5:
                start = kv_cache.cache_length(ours) - 4
                kv_cache.keep(ours, start, [start + 1, start + 3])
                kv_cache.keep(theirs, start, [start + 1, start + 3])
    for la, lb in zip(ours.layers, theirs.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
