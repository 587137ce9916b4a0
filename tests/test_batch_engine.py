"""The batch engine: ragged verification equals per-sequence verification, and every request's output equals
the same request decoded alone by `Decoder`, whatever joins, leaves or shares its batch."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from leapdecode import Decoder, DraftTree, SamplingParams
from leapdecode.batching import BatchEngine
from leapdecode.step import verify_rows
from leapdecode.engine import _settings
from leapdecode.verifiers import verify
from conftest import tiny_loaded
from test_exactness import random_prompts


def _ragged_case(seed: int, batch: int = 5, vocab: int = 32):
    """Random logits (B, Q, V) and chains of different lengths that follow the argmax for a while."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    sizes = [rng.randint(0, 6) for _ in range(batch)]
    q = max(sizes) + 1
    logits = torch.randn(batch, q, vocab) * 3
    trees = []
    for b, n in enumerate(sizes):
        argmax = logits[b].argmax(-1).tolist()
        good = rng.randint(0, n)
        chain = argmax[:good] + [(t + 1) % vocab for t in argmax[good:n]]
        trees.append(DraftTree.chain(torch.tensor(chain, dtype=torch.long)))
    return trees, logits


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_ragged_verifier_equals_per_sequence_verification(seed, temperature):
    trees, logits = _ragged_case(seed)
    params = [SamplingParams(temperature=temperature if b % 2 else 0.0, top_p=0.95) for b in range(len(trees))]
    gens = [torch.Generator().manual_seed(100 + b) for b in range(len(trees))]
    ref_gens = [torch.Generator().manual_seed(100 + b) for b in range(len(trees))]
    verdict = verify_rows(trees, logits, params, gens)
    for b, tree in enumerate(trees):
        alone = verify(tree, logits[b : b + 1, : tree.size + 1], params[b], ref_gens[b])
        assert verdict.accepted_nodes[b] == alone.accepted_nodes[0]
        assert verdict.tokens[b] == alone.tokens[0]
        assert len(verdict.accepted_nodes[b]) <= tree.size


def _mixed_engine(arch: str, max_batch_size: int, compact_slack: int, fit_width: bool = False):
    target = tiny_loaded(arch, scale=6.0)
    draft = tiny_loaded(arch, seed=1, scale=6.0, layers=1)
    methods = {"ar": {}, "pld": {}, "draft": {"num_draft_tokens": 4}}
    engine = BatchEngine(target, methods, draft=draft, max_batch_size=max_batch_size, compact_slack=compact_slack,
                         fit_width=fit_width)
    return target, engine


@pytest.mark.parametrize("max_batch_size,compact_slack,fit_width", [(4, 0, False), (8, 16, False), (4, 0, True)])
def test_greedy_outputs_equal_decoding_alone(arch, max_batch_size, compact_slack, fit_width):
    """Mixed methods and lengths, requests joining mid-run and waiting for a slot, prompts of one token;
    with every drafted token verified (fixed width) and with the cost-aware width (drafts cut per step)."""
    target, engine = _mixed_engine(arch, max_batch_size, compact_slack, fit_width)
    prompts = random_prompts(2, n=8) + [[5], [7, 7]]
    methods = ["ar", "pld", "draft"]
    jobs = []
    for i, prompt in enumerate(prompts):
        method, n = methods[i % 3], 6 + 4 * i
        jobs.append((prompt, method, n, engine.submit(prompt, method, _settings(max_new_tokens=n))))
        if i % 3 == 2:  # let the batch run a little before the next ones arrive
            engine.step()
            engine.step()
    engine.run_until_done()
    ar = Decoder(target, "ar")
    for prompt, method, n, handle in jobs:
        assert handle.error is None
        assert handle.result.token_ids == ar.generate(prompt, max_new_tokens=n).token_ids, method
        assert handle.result.stats.stop_reason == "max_new_tokens"
    assert engine.metrics.requests_finished == len(jobs)
    assert engine.metrics.mean_batch_size > 1.5
    if not fit_width:
        assert engine.metrics.mean_accepted > 1.0  # pld and draft accepted something


def test_cache_rows_equal_plain_prefill_after_steps(arch):
    """Between steps, each row's valid columns hold exactly the KV entries of its committed text."""
    target, engine = _mixed_engine(arch, max_batch_size=4, compact_slack=4)
    for i, prompt in enumerate(random_prompts(3, n=4)):
        engine.submit(prompt, ["pld", "ar", "draft"][i % 3], _settings(max_new_tokens=30))
    checked = 0
    for _ in range(6):
        engine.step()
        for b, row in enumerate(engine.rows):
            ref = DynamicCache()
            with torch.inference_mode():
                target.model(input_ids=torch.tensor([row.tokens[:-1]]), cache=ref, use_cache=True)
            cols = engine.cache.valid[b].nonzero().squeeze(1)
            assert cols.numel() == len(row.tokens) - 1
            for (keys, values), layer in zip(engine.cache.layers, ref.layers):
                torch.testing.assert_close(keys[b][:, cols], layer.keys[0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(values[b][:, cols], layer.values[0], atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked >= 12


def test_seeded_sampling_equals_decoding_alone():
    target, engine = _mixed_engine("llama", max_batch_size=4, compact_slack=16)
    prompts = random_prompts(4, n=4)
    jobs = []
    for i, prompt in enumerate(prompts):
        method = ["ar", "pld", "draft", "pld"][i]
        kw = dict(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=10 + i)
        jobs.append((prompt, method, kw, engine.submit(prompt, method, _settings(**kw))))
    engine.run_until_done()
    for prompt, method, kw, handle in jobs:
        draft = engine.draft if method == "draft" else None
        extra = {"num_draft_tokens": 4} if method == "draft" else {}
        alone = Decoder(target, method, draft=draft, **extra).generate(prompt, **kw)
        assert handle.result.token_ids == alone.token_ids, method


def test_stops_match_decoder_and_cancel_frees_the_slot():
    free = Decoder(tiny_loaded("qwen2", scale=6.0), "ar").generate(random_prompts(4)[1], max_new_tokens=30)
    eos = free.token_ids[9]
    target = tiny_loaded("qwen2", scale=6.0, stop_token_ids=[eos])
    engine = BatchEngine(target, {"ar": {}, "pld": {}}, max_batch_size=2)
    stop_text = " ".join(f"w{t}" for t in free.token_ids[4:6])
    a = engine.submit(random_prompts(4)[1], "pld", _settings(max_new_tokens=30))
    b = engine.submit(random_prompts(4)[0], "ar", _settings(max_new_tokens=30, stop=[stop_text]))
    c = engine.submit(random_prompts(4)[1], "ar", _settings(max_new_tokens=30, stop=[stop_text]))
    engine.step()
    assert len(engine.rows) == 2 and engine.metrics.waiting == 1
    b.cancel()
    engine.step()  # the cancelled row leaves and the waiting request takes its slot in the same step
    assert b.error == "cancelled" and len(engine.rows) == 2
    engine.run_until_done()
    for handle, prompt, kw in ((a, random_prompts(4)[1], {}), (c, random_prompts(4)[1], {"stop": [stop_text]})):
        alone = Decoder(target, "ar").generate(prompt, max_new_tokens=30, **kw)
        assert (handle.result.token_ids, handle.result.text) == (alone.token_ids, alone.text)
        assert handle.result.stats.stop_reason == alone.stats.stop_reason
    assert a.result.stats.stop_reason == "eos" and c.result.stats.stop_reason == "stop_string"
    assert engine.rows == [] and engine.cache.width == 0


@pytest.mark.parametrize("kind", ["medusa", "hydra", "hydra++", "falcon"])
def test_feature_drafters_draft_and_equal_decoding_alone(kind, tmp_path):
    """Trained drafters read the target's final hidden states from the batched pass: they draft (trees), and
    greedy and seeded output, drafts and accepts equal the same request decoded alone; an ar row shares the
    batch (only some rows ask for the features)."""
    from test_trained_drafters import OPTIONS, fresh_drafter, kind_of

    target = tiny_loaded("llama", scale=3.0)
    method, options = kind_of(kind), {"drafter": str(fresh_drafter(kind, target, tmp_path / kind)), **OPTIONS[kind]}
    engine = BatchEngine(target, {"ar": {}, method: options}, max_batch_size=4, step_draft_budget=64,
                         fit_width=False)  # every row keeps its whole tree: the same drafts as alone
    jobs = []
    for i, prompt in enumerate(random_prompts(5, n=4)):
        kw = dict(max_new_tokens=20, temperature=0.8, seed=5) if i == 2 else dict(max_new_tokens=20)
        name = "ar" if i == 3 else method
        jobs.append((prompt, name, kw, engine.submit(prompt, name, _settings(**kw))))
    engine.run_until_done()
    for prompt, name, kw, handle in jobs:
        assert handle.error is None
        alone = Decoder(target, name, fit_width=False, **(options if name == method else {})).generate(prompt, **kw)
        assert handle.result.token_ids == alone.token_ids, name
        assert handle.result.stats.accept_lengths == alone.stats.accept_lengths, name
        if name == method:
            assert handle.result.stats.drafted_tokens == alone.stats.drafted_tokens > 0


def test_trained_drafter_loaded_once_per_engine(tmp_path, monkeypatch):
    """Requests share the loaded network (read-only) but each has its own drafter."""
    from leapdecode.drafters import checkpoint
    from test_trained_drafters import fresh_drafter

    target = tiny_loaded("llama", scale=3.0)
    folder = fresh_drafter("hydra", target, tmp_path / "hydra")
    loads = []
    real = checkpoint.load_drafter
    monkeypatch.setattr(checkpoint, "load_drafter", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    engine = BatchEngine(target, {"hydra": {"drafter": str(folder), "paths": "0;1;0,0"}}, max_batch_size=4)
    for prompt in random_prompts(6, n=3):
        engine.submit(prompt, "hydra", _settings(max_new_tokens=8))
    engine.step()
    assert len(engine.rows) == 3 and len(loads) == 1
    assert len({id(r.drafter) for r in engine.rows}) == 3 and len({id(r.drafter.net) for r in engine.rows}) == 1
    engine.run_until_done()
    assert len(loads) == 1 and engine.metrics.requests_finished == 3


def test_a_failing_row_fails_alone():
    """A row whose sampling (NaN temperature), drafter or joining (a seed no generator takes) raises ends with
    its error; no orphan cache row is left, and the other rows' output equals decoding alone."""
    import math

    from leapdecode.batching.requests import Pending, SequenceHandle
    from leapdecode.engine import GenerationSettings

    target = tiny_loaded("llama", scale=6.0)
    engine = BatchEngine(target, {"ar": {}, "pld": {}}, max_batch_size=8)
    prompts = random_prompts(7, n=4)
    good = [engine.submit(prompts[0], "pld", _settings(max_new_tokens=20)),
            engine.submit(prompts[1], "ar", _settings(max_new_tokens=20, temperature=0.8, seed=3))]
    nan = engine.submit(prompts[2], "ar", GenerationSettings(max_new_tokens=20,
                                                              params=SamplingParams(temperature=math.nan)))
    broken = engine.submit(prompts[3], "pld", _settings(max_new_tokens=20))
    engine.step()
    assert "nan" in nan.error and engine.metrics.requests_failed == 1
    assert len(engine.rows) == engine.cache.rows == 3
    next(r for r in engine.rows if r.handle is broken).drafter.propose = lambda ctx: 1 / 0
    orphan = SequenceHandle(-1, None)  # past submit's check, as a request that fails while joining
    engine._waiting.append(Pending(orphan, prompts[2], "pld", _settings(max_new_tokens=20, seed=2**70)))
    good.append(engine.submit(prompts[2], "ar", _settings(max_new_tokens=20)))
    engine.step()
    assert "ZeroDivisionError" in broken.error and "Overflow" in orphan.error
    assert len(engine.rows) == engine.cache.rows == 3 and engine.metrics.requests_failed == 3
    engine.run_until_done()
    kws = [{}, dict(temperature=0.8, seed=3), {}]
    for handle, prompt, kw in zip(good, [prompts[0], prompts[1], prompts[2]], kws):
        assert handle.error is None
        assert handle.result.token_ids == Decoder(target, "ar").generate(prompt, max_new_tokens=20, **kw).token_ids
    assert engine.rows == [] and engine.cache.width == 0


def test_bad_seed_and_incompatible_draft_are_refused():
    from leapdecode.errors import IncompatibleDraftError, InvalidSettingError

    target = tiny_loaded("llama")
    engine = BatchEngine(target, {"ar": {}})
    with pytest.raises(InvalidSettingError, match="seed"):
        engine.submit([1, 2], "ar", _settings(seed=2**70))
    assert engine.metrics.waiting == 0
    with pytest.raises(IncompatibleDraftError, match="cannot draft"):
        BatchEngine(target, {"draft": {}}, draft=tiny_loaded("llama", vocab_size=32, layers=1))


def test_fit_width_per_method_and_for_the_engine():
    """`fit_width=false` as a method's option keeps that method's drafts whole; the engine-wide switch turns
    the width policy off; any other value is refused."""
    from leapdecode.errors import InvalidSettingError

    target = tiny_loaded("llama")
    engine = BatchEngine(target, {"ar": {}, "pld": {"fit_width": "false"}})
    assert engine.rates["pld"] is None and engine.rates["ar"] is not None and engine.cut is not None
    assert BatchEngine(target, {"pld": {}}, fit_width=False).cut is None
    with pytest.raises(InvalidSettingError, match="fit_width"):
        BatchEngine(target, {"pld": {"fit_width": "maybe"}})
