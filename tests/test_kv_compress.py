"""Compressed KV caches (quant, GEAR): round-trip error, rollback inside the exact window, and speculation on a
compressed cache giving the tokens `ar` gives on that same cache."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from leapdecode import Decoder
from leapdecode.errors import InvalidSettingError
from leapdecode.kv_compress import (BlockCodec, CompressedCache, KVRollbackError, KVSettings, kv_bytes,
                                    make_cache, take_settings)
from leapdecode.lm import CausalLM
from conftest import tiny_loaded

# a small window and block so that short tiny-model runs cross many view changes
KV = dict(kv_window=16, kv_block=8)


def _kv_like(seed: int = 0, t: int = 64, d: int = 64) -> torch.Tensor:
    """Key-like data: a few outlier channels and a few spikes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, t, d, generator=g)
    x[..., 5] += 6.0
    x[..., 17] *= 4.0
    x[0, 1, 9, 30] = 25.0
    return x


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("bits,bound", [(2, 0.75), (4, 0.16), (8, 0.01)])
def test_round_trip_error_bounds_and_gear_beats_quant(kind, bits, bound):
    x = _kv_like(bits)
    quant = BlockCodec(kind, bits).round_trip(x)
    gear = BlockCodec(kind, bits, rank=2, outliers=0.01).round_trip(x)
    assert quant.shape == x.shape and quant.dtype == x.dtype
    q_err, g_err = _rel_err(quant, x), _rel_err(gear, x)
    assert q_err < bound
    assert g_err < 0.85 * q_err
    # per-entry bound of asymmetric rounding: half a step of the group's range; with 8-bit scales the step is
    # at most 2^(1/16) coarser and the range grows by at most one step of the zero points' grid
    if kind == "value":
        y = x.reshape(2, 3, -1, 64)
        lo = y.amin(-1)
        z_step = (lo.amax(-1, keepdim=True) - lo.amin(-1, keepdim=True)) / 255
        for scale_bits, slack, widen in ((16, 1.01, 0.0), (8, 2 ** (1 / 16) * 1.001, z_step)):
            back = BlockCodec(kind, bits, scale_bits=scale_bits).round_trip(x)
            step = (y.amax(-1) - lo + widen) / (2 ** bits - 1)
            err = (back - x).reshape(2, 3, -1, 64).abs().amax(-1)
            assert bool((err <= 0.5 * step * slack + 1e-3).all()), scale_bits


def test_outliers_are_kept_exactly_and_bytes_shrink():
    x = _kv_like(3)
    codec = BlockCodec("value", 2, rank=0, outliers=0.02)
    blocks = codec.compress(x)
    back = codec.decompress(blocks, 64, 64, x.dtype)
    assert back[0, 1, 9, 30] == x[0, 1, 9, 30]  # the spike is an outlier, stored as it was
    assert blocks.out_index.shape[-1] == round(0.02 * 64 * 64)
    bf16 = x.numel() * 2
    assert blocks.nbytes < 0.25 * bf16
    assert BlockCodec("value", 4).compress(x).nbytes < 0.3 * bf16


def test_pack_unpack_round_trip():
    for bits in (2, 4, 8):
        codec = BlockCodec("value", bits)
        q = torch.randint(0, 2 ** bits, (2, 3, 64), dtype=torch.uint8)
        assert torch.equal(codec.unpack(codec.pack(q)), q)


def _feed(cache, chunks):
    """Feed (keys, values) chunks to layer 0 of `cache`; return what the last update returned."""
    out = None
    for k, v in chunks:
        out = cache.update(k, v, 0)
    return out


def _chunks(seed: int, sizes):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)) for n in sizes]


@pytest.mark.parametrize("kind", ["quant", "gear"])
def test_rollback_inside_the_window_equals_never_having_fed(kind):
    committed = _chunks(0, [30, 1, 1, 1, 1])
    draft = _chunks(1, [5])
    nxt = _chunks(2, [1])
    a = CompressedCache(kind, 4, rank=1, outliers=0.02, window=16, block=8)
    _feed(a, committed + draft)
    a.crop_to(34)
    keys_a, values_a = _feed(a, nxt)
    b = CompressedCache(kind, 4, rank=1, outliers=0.02, window=16, block=8)
    keys_b, values_b = _feed(b, committed + nxt)
    assert a.get_seq_length() == b.get_seq_length() == 35
    assert torch.equal(keys_a, keys_b) and torch.equal(values_a, values_b)
    assert a.layers[0].compressed_length > 0  # the rollback happened with compressed blocks present


def test_keep_compacts_inside_the_window():
    committed = _chunks(0, [40])
    tree = _chunks(1, [6])
    a = CompressedCache("gear", 4, rank=1, outliers=0.02, window=16, block=8)
    _feed(a, committed + tree)
    a.keep(40, [41, 43])
    k_tree, v_tree = tree[0]
    b = CompressedCache("gear", 4, rank=1, outliers=0.02, window=16, block=8)
    _feed(b, committed + [(k_tree[:, :, [1, 3]], v_tree[:, :, [1, 3]])])
    nxt = _chunks(2, [1])
    ka, va = _feed(a, nxt)
    kb, vb = _feed(b, nxt)
    assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_crop_into_compressed_blocks_raises():
    cache = CompressedCache("quant", 4, window=16, block=8)
    _feed(cache, _chunks(0, [40, 1]))  # the second update compresses [0, 24)
    assert cache.layers[0].compressed_length == 24
    with pytest.raises(KVRollbackError, match="compressed"):
        cache.crop_to(20)
    with pytest.raises(KVRollbackError):
        cache.keep(10, [12])
    cache.crop_to(30)  # inside the exact part: fine
    assert cache.get_seq_length() == 30


def test_sink_rows_stay_exact_and_out_of_the_first_blocks_groups():
    """The first token (the attention sink, unlike the others) is read back exactly, and its values do not
    widen the key groups of the rest of its block."""
    (k, v), = _chunks(0, [40])
    k[:, :, 0] = 40.0 * torch.sign(k[:, :, 0])  # a first token far outside the others' range
    errors = {}
    for sink in (0, 1):
        cache = CompressedCache("quant", 4, window=16, block=8, sink=sink)
        keys, values = _feed(cache, [(k, v), (k[:, :, :1], v[:, :, :1])])
        assert cache.layers[0].compressed_length == 24
        errors[sink] = (keys[:, :, 1:8] - k[:, :, 1:8]).abs().max().item()
        if sink:
            assert torch.equal(keys[:, :, :1], k[:, :, :1].half().float())
            assert torch.equal(values[:, :, :1], v[:, :, :1].half().float())
            assert cache.layers[0].sinks[0].shape == (1, 2, 1, 16)
    assert errors[1] < errors[0] / 10


def test_view_depends_on_position_only():
    """A query at position p sees compressed blocks up to C(p), however the tokens were fed."""
    cache = CompressedCache("quant", 4, window=16, block=8)
    assert [cache.view_length(p) for p in (0, 16, 23, 24, 31, 32)] == [0, 0, 0, 8, 8, 16]
    assert cache.view_changes(0, 40) == [24, 32]
    assert cache.view_changes(24, 33) == [32]


def test_settings_are_validated():
    with pytest.raises(InvalidSettingError):
        KVSettings(kind="gear", bits=3)
    with pytest.raises(InvalidSettingError):
        take_settings({"kv_bits": 4})  # bits without a compressed cache
    with pytest.raises(InvalidSettingError):
        take_settings({"kv_cache": "hf-quanto"})  # perplexity only
    options = {"kv_cache": "gear", "kv_bits": 2, "num_draft_tokens": 3}
    settings = take_settings(options)
    assert settings.kind == "gear" and settings.bits == 2 and options == {"num_draft_tokens": 3}
    assert take_settings({"kv_cache": "none"}) is None
    for sink in (-1, 64, 1.5):
        with pytest.raises(InvalidSettingError, match="kv_sink"):
            KVSettings(kind="gear", sink=sink)
    assert KVSettings(kind="gear", sink=0, block=8).sink == 0


def random_prompts(seed: int, n: int = 4, vocab: int = 64) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        base = [rng.randrange(1, vocab) for _ in range(rng.randint(2, 6))]
        length = rng.randint(20, 50)
        prompts.append((base * 20)[:length] if i % 2 else [rng.randrange(1, vocab) for _ in range(length)])
    return prompts


LOSSLESS = [("pld", {}), ("pld-tree", {}), ("aded", {}), ("draft-tree", "self"), ("draft", "self"),
            ("lookahead", {})]


@pytest.mark.parametrize("kind,bits", [("gear", 2), ("quant", 4)])
def test_lossless_methods_on_a_compressed_cache_equal_ar_on_it(arch, kind, bits):
    target = tiny_loaded(arch, scale=6.0)
    kv = dict(kv_cache=kind, kv_bits=bits, kv_rank=1, kv_outliers=0.05, **KV)
    ar = Decoder(target, "ar", **kv)
    plain = Decoder(target, "ar")
    prompts = random_prompts(7)
    refs = [ar.generate(p, max_new_tokens=48).token_ids for p in prompts]
    assert any(plain.generate(p, max_new_tokens=48).token_ids != r for p, r in zip(prompts, refs)), \
        "the compressed cache should change something at 2-4 bits on random weights"
    for method, extra in LOSSLESS:
        kw = {"draft": target} if extra == "self" else extra
        dec = Decoder(target, method, **kw, **kv)
        for p, ref in zip(prompts, refs):
            out = dec.generate(p, max_new_tokens=48)
            assert out.token_ids == ref, (method, p)
        assert isinstance(dec.lm.cache, CompressedCache)
        assert dec.lm.cache.layers[0].compressed_length > 0


def test_tree_pass_cut_keeps_node_order_and_hidden_states():
    """A tree pass cut at a view change returns the logits a one-token-at-a-time walk gives."""
    target = tiny_loaded("llama", scale=6.0)
    from leapdecode import DraftTree

    prompt = list(range(1, 23))
    tree = DraftTree(torch.tensor([[5, 6, 7, 8, 9]]), (-1, 0, 1, 0, -1))
    lm = CausalLM(target.model, cache_factory=lambda: make_cache(KVSettings("gear", 4, 1, 0.05, 16, 8)))
    lm.keep_hidden = True
    lm.forward(torch.tensor([prompt[:-1]]))
    logits = lm.score_tree(torch.tensor([[prompt[-1]]]), tree)  # positions 21..24 cross 24
    hidden = lm.last_hidden
    assert logits.shape[1] == tree.size + 1 and hidden.shape[1] == tree.size + 1
    for node, path in [(0, [5]), (1, [5, 6]), (2, [5, 6, 7]), (3, [5, 8]), (4, [9])]:
        ref = CausalLM(target.model, cache_factory=lambda: make_cache(KVSettings("gear", 4, 1, 0.05, 16, 8)))
        ref.forward(torch.tensor([prompt[:-1]]))
        for t in [prompt[-1]] + path[:-1]:
            ref.forward(torch.tensor([[t]]))
        row = ref.forward(torch.tensor([[path[-1]]]))[0, -1]
        assert torch.allclose(logits[0, node + 1], row, atol=1e-4), node
    # the cache holds the prompt, the root and the nodes in node order: keeping path [0, 3] works
    lm.keep_path(21, [0, 3])
    assert lm.length == 24


def test_kv_bytes_counts_real_tensors():
    target = tiny_loaded("qwen2")
    plain = Decoder(target, "ar")
    comp = Decoder(target, "ar", kv_cache="quant", kv_bits=4, **KV)
    prompt = random_prompts(1)[0] * 4
    plain.generate(prompt, max_new_tokens=40)
    comp.generate(prompt, max_new_tokens=40)
    layers, heads, d = 2, 2, 16
    used = plain.lm.length * layers * 2 * heads * d * 4  # float32 keys and values
    assert kv_bytes(plain.lm.cache) >= used  # the plain cache may hold spare room
    cache = comp.lm.cache
    assert kv_bytes(cache) == sum(sum(t.nbytes for t in [layer.keys, layer.values] + layer.key_blocks.tensors()
                                      + layer.value_blocks.tensors() + list(layer.sinks)) for layer in cache.layers)
    assert kv_bytes(cache) < 0.5 * used


def test_sliding_window_model_keeps_every_position():
    """gemma3's sliding layers get their window from the mask; the cache keeps (and compresses) everything."""
    target = tiny_loaded("gemma3", scale=6.0)
    dec = Decoder(target, "ar", kv_cache="gear", kv_bits=4, **KV)
    out = dec.generate(random_prompts(3)[0], max_new_tokens=30)
    assert len(out.token_ids) == 30
    assert all(layer.get_seq_length() == dec.lm.length for layer in dec.lm.cache.layers)


def test_bench_engine_runner_reports_kv_bytes():
    from leapdecode.bench.runner import BenchSettings, make_runner

    target = tiny_loaded("llama")
    prompt = random_prompts(2)[1] * 2
    plain = make_runner("ar", target, None, BenchSettings(max_new_tokens=20, warmup_tokens=2))
    gear = make_runner("pld@kv_cache=gear@kv_bits=2@kv_window=16@kv_block=8", target, None,
                       BenchSettings(max_new_tokens=20, warmup_tokens=2))
    plain.run(prompt, 20)
    gear.run(prompt, 20)
    assert 0 < gear.kv_bytes < plain.kv_bytes


@pytest.mark.parametrize("bits,rank,outliers,bound", [(4, 0, 0.005, 0.285), (4, 1, 0.005, 0.32), (2, 2, 0.02, 0.30)])
def test_block_bytes_packed_codes_8_bit_scales(bits, rank, outliers, bound):
    """Two 4-bit (four 2-bit) codes a byte, one byte per scale and zero point, float16 factors and outliers."""
    x = _kv_like(5)
    for kind in ("key", "value"):
        codec = BlockCodec(kind, bits, group=16 if bits == 2 else 64, rank=rank, outliers=outliers)
        blocks = codec.compress(x)
        parts = blocks.nbytes_by_part()
        assert parts["codes"] == x.numel() * bits // 8
        groups = x.numel() // codec.group
        assert parts["scales"] == 2 * groups + 2 * 3 * 2 * 3  # a byte each + three float16 per head and block
        assert blocks.nbytes == sum(parts.values())
        assert blocks.nbytes <= bound * x.numel() * 2, (kind, blocks.nbytes / (x.numel() * 2))


def test_decompression_into_a_slice_and_block_by_block_is_the_same():
    x = _kv_like(6, t=128)
    for kind in ("key", "value"):
        codec = BlockCodec(kind, 2, group=16, rank=2, outliers=0.02)
        blocks = codec.compress(x[:, :, :64]).cat(codec.compress(x[:, :, 64:]))
        whole = codec.decompress(blocks, 64, 64, torch.float32)
        first = codec.decompress(blocks, 64, 64, torch.float32, count=1)
        assert torch.equal(whole[:, :, :64], first)
        out = torch.full((2, 3, 140, 64), 7.0)
        codec.decompress(blocks, 64, 64, torch.float32, out=out[:, :, :128])
        assert torch.equal(out[:, :, :128], whole) and bool((out[:, :, 128:] == 7.0).all())
        half = codec.decompress(blocks, 64, 64, torch.bfloat16)
        assert half.dtype == torch.bfloat16 and torch.equal(half, whole.to(torch.bfloat16))


def test_float32_window_is_stored_in_float16_and_counted():
    chunks = _chunks(0, [40])
    cache = CompressedCache("gear", 4, rank=0, outliers=0.005, window=16, block=8)
    keys, values = _feed(cache, chunks + _chunks(1, [1]))
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.float16 and keys.dtype == torch.float32
    exact = layer.get_seq_length() - layer.compressed_length
    assert torch.equal(keys[..., -1:, :], _chunks(1, [1])[0][0].half().float())
    blocks = layer.key_blocks.nbytes + layer.value_blocks.nbytes
    assert cache.nbytes == blocks + 2 * exact * 2 * 16 * 2  # k and v, heads, head dim, float16
    wide = CompressedCache("gear", 4, rank=0, outliers=0.005, window=16, block=8, window_dtype=None)
    _feed(wide, chunks)
    assert wide.layers[0].keys.dtype == torch.float32


# ----- compression in one call, and attention reading the blocks itself (the exact runtime's C++ kernel) ---------

@pytest.mark.parametrize("bits,rank,outliers,group,scale_bits", [(4, 0, 0.005, 64, 8), (2, 2, 0.03, 16, 8),
                                                                 (4, 1, 0.01, 64, 16)])
def test_blocks_compressed_together_equal_blocks_compressed_alone(bits, rank, outliers, group, scale_bits):
    x = _kv_like(8, t=192)
    for kind in ("key", "value"):
        codec = BlockCodec(kind, bits, group, rank, outliers, scale_bits)
        together = codec.compress_blocks(x, 64)
        alone = codec.compress(x[:, :, :64])
        for n in (1, 2):
            alone = alone.cat(codec.compress(x[:, :, 64 * n:64 * (n + 1)]))
        for a, b in zip(together.tensors(), alone.tensors()):
            assert torch.equal(a, b)


def _native():
    from leapdecode.runtime import native

    kernels = native.kernels()
    if kernels is None:
        pytest.skip("no C++ compiler here")
    return kernels


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rank=st.integers(0, 2), outliers=st.sampled_from([0.0, 0.01, 0.05]),
       scale_bits=st.sampled_from([8, 16]), blocks=st.integers(1, 3), exact=st.integers(1, 9),
       queries=st.integers(1, 5), dim=st.sampled_from([16, 24, 64]), tree=st.booleans(), sink=st.integers(0, 2),
       seed=st.integers(0, 99))
def test_attention_over_blocks_equals_attention_over_decompressed_blocks(bits, rank, outliers, scale_bits, blocks,
                                                                         exact, queries, dim, tree, sink, seed):
    """The kernel decodes the blocks with decompress's float32 operations (and writes exact sink rows over the
    first block), so its output is bit for bit the row-invariant attention's on the decompressed keys and values,
    for chains and tree masks alike."""
    from leapdecode.kv_compress.cache import _block_tensors
    from leapdecode.kv_compress.codec import SCALE_TABLE
    from leapdecode.runtime.attention import key_lists

    kernels = _native()
    g = torch.Generator().manual_seed(seed)
    block, heads, group = 8, 2, 3
    queries = min(queries, exact)
    codecs = [BlockCodec(kind, bits, 8 if kind == "key" else dim // 2 if dim % 16 == 0 else dim, rank, outliers,
                         scale_bits) for kind in ("key", "value")]
    old = [torch.randn(1, heads, blocks * block, dim, generator=g) * 3 for _ in range(2)]
    stored = [codec.compress_blocks(x, block) for codec, x in zip(codecs, old)]
    near = [torch.randn(1, heads, exact, dim, generator=g) for _ in range(2)]
    sinks = [torch.randn(1, heads, sink, dim, generator=g).half() if sink else None for _ in range(2)]
    view = blocks * block
    old = [codec.decompress(b, block, dim, torch.float32) for codec, b in zip(codecs, stored)]
    for x, rows in zip(old, sinks):
        if rows is not None:
            x[:, :, :sink] = rows.float()
    full = [torch.cat([x, e], dim=2) for x, e in zip(old, near)]
    length = view + exact
    mask = None
    if tree:  # each query sees the past and a random subset of the other new positions before it, itself
        visible = torch.ones(queries, length, dtype=torch.bool)
        new = torch.rand(queries, queries, generator=g) < 0.5
        visible[:, length - queries:] = new.tril() | torch.eye(queries, dtype=torch.bool)
        mask = visible[None, None]
    lists = key_lists(mask, 1, queries, length)
    query = torch.randn(1, heads * group, queries, dim, generator=g)
    ref = kernels.row_attention(query, full[0], full[1], lists.start, lists.stop, lists.col_ptr, lists.columns, 0.3)
    got = kernels.block_attention(query, near[0], near[1], view, block, _block_tensors(stored[0], sinks[0]),
                                  _block_tensors(stored[1], sinks[1]), codecs[0].layout(), codecs[1].layout(),
                                  SCALE_TABLE, lists.start, lists.stop, lists.col_ptr, lists.columns, 0.3)
    assert torch.equal(got, ref)


def _runtime_lm(target, settings: KVSettings, in_attention: bool) -> CausalLM:
    return CausalLM(target.model, cache_factory=lambda: make_cache(settings, target.model.config, in_attention))


def test_runtime_attention_reads_blocks_with_the_bits_of_decompression(arch):
    """On the exact runtime the attention reads old blocks itself; logits equal those of decompressing them."""
    from conftest import runtime_loaded
    from leapdecode.runtime.attention import reads_blocks

    _native()
    target = runtime_loaded(arch)
    assert reads_blocks(target.model) and not reads_blocks(tiny_loaded(arch).model)
    settings = KVSettings("gear", 2, window=16, block=8)
    fused, unfused = _runtime_lm(target, settings, True), _runtime_lm(target, settings, False)
    prompt = torch.tensor([random_prompts(4)[0]])
    tokens = [prompt[:, :-1], prompt[:, -1:], torch.tensor([[3, 9, 4]]), torch.tensor([[7]]), torch.tensor([[1] * 12])]
    for ids in tokens:
        first = fused.length == 0
        assert torch.equal(fused.forward(ids, prompt=first), unfused.forward(ids, prompt=first))
    assert fused.cache.layers[0].compressed_length > 0 and fused.cache.layers[0].hidden > 0


def test_a_prompt_pass_stays_exact_and_is_compressed_afterwards():
    """A prompt fed alone into the empty cache sees exact keys (GEAR compresses after prefill); the next pass
    compresses it."""
    target = tiny_loaded("llama", scale=6.0)
    settings = KVSettings("gear", 4, window=16, block=8, window_dtype="model")
    prompt = torch.tensor([random_prompts(5)[0][:40]])
    plain = CausalLM(target.model)
    lm = CausalLM(target.model, cache_factory=lambda: make_cache(settings))
    assert torch.equal(lm.forward(prompt, prompt=True), plain.forward(prompt, prompt=True))
    assert lm.cache.layers[0].compressed_length == 0
    lm.forward(torch.tensor([[5]]))
    assert lm.cache.layers[0].compressed_length == 24  # view of position 40: 8 * ((40 - 16) // 8)


def test_a_commit_settles_the_cache_to_its_window_and_changes_no_logits():
    """A commit (the CausalLM's crop) compresses now what the next pass would compress first: between passes the
    exact part is the window (window to window + block - 1 tokens), the bytes drop, the logits stay the same."""
    target = tiny_loaded("llama", scale=6.0)
    settings = KVSettings("gear", 4, window=16, block=8, window_dtype="model")
    ids = random_prompts(5)[1][:40] + list(range(3, 40))
    lazy = CausalLM(target.model, cache_factory=lambda: make_cache(settings))
    settled = CausalLM(target.model, cache_factory=lambda: make_cache(settings))
    for lm in (lazy, settled):
        lm.forward(torch.tensor([ids[:30]]), prompt=True)
    settled.crop(settled.length)
    layer = settled.cache.layers[0]
    assert layer.compressed_length == 8 and layer.exact_start == 8  # view of position 30: 8 * ((30 - 16) // 8)
    smaller = []
    for start in range(30, len(ids), 5):  # 5-token passes, each committed in `settled` only
        chunk = torch.tensor([ids[start:start + 5]])
        assert torch.equal(lazy.forward(chunk), settled.forward(chunk))
        settled.crop(settled.length)
        assert settings.window <= settled.length - layer.exact_start < settings.window + settings.block
        assert kv_bytes(settled.cache) <= kv_bytes(lazy.cache)
        smaller.append(kv_bytes(settled.cache) < kv_bytes(lazy.cache))
    assert any(smaller)  # after a pass that crossed a view change: the lazy cache still holds that block exactly


@pytest.mark.parametrize("kind,bits", [("gear", 2), ("gear", 4)])
def test_lossless_methods_on_the_runtime_with_a_compressed_cache_equal_ar_on_it(arch, kind, bits):
    from conftest import runtime_loaded

    _native()
    target = runtime_loaded(arch)
    kv = dict(kv_cache=kind, kv_bits=bits, **KV)
    prompts = random_prompts(9, n=3)
    refs = [Decoder(target, "ar", **kv).generate(p, max_new_tokens=40).token_ids for p in prompts]
    for method, extra in [("pld", {}), ("pld-tree", {}), ("draft", "self")]:
        kw = {"draft": target} if extra == "self" else extra
        dec = Decoder(target, method, **kw, **kv)
        for p, ref in zip(prompts, refs):
            assert dec.generate(p, max_new_tokens=40).token_ids == ref, (method, p)
        assert dec.lm.cache._view.in_attention
