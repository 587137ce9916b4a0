"""Under sampling, lossless methods follow the target's exact distribution (seeded statistical tests).

The exact distribution of the first three generated tokens is computed from the target's logits
(after temperature/top-k/top-p); thousands of seeded generations per method are compared with it by a
chi-square test. A deliberately wrong sampler shows the test can fail.
"""
from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

import leapdecode.step as step
from leapdecode import Decoder, SamplingParams
from leapdecode.sampling import probs_from_logits, sample
from leapdecode.verifiers import Verdict, verify
from leapdecode.verifiers.speculative_sampling import verify_sampling
from conftest import tiny_loaded

VOCAB = 8
STEPS = 3
RUNS = 2000
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]  # repetitive: prompt lookup drafts from it


def exact_distribution(target, prompt, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(x1, x2, x3 | prompt) under the target and `params`."""
    seqs = list(itertools.product(range(VOCAB), repeat=STEPS))
    with torch.inference_mode():
        logits = target.model(input_ids=torch.tensor([prompt + list(s) for s in seqs])).logits
    probs = probs_from_logits(logits[:, len(prompt) - 1 : len(prompt) - 1 + STEPS], params)  # (S, STEPS, V)
    chosen = probs.gather(-1, torch.tensor(seqs).unsqueeze(-1)).squeeze(-1)  # (S, STEPS)
    return {seq: float(p) for seq, p in zip(seqs, chosen.prod(-1))}


def chi_square_pvalue(counts: Counter, dist: dict, runs: int) -> float:
    """Pearson chi-square, cells with expected count < 5 pooled into one."""
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for seq, p in dist.items():
        expected, observed = p * runs, counts.get(seq, 0)
        if expected < 5:
            pooled_obs += observed
            pooled_exp += expected
            continue
        stat += (observed - expected) ** 2 / expected
        df += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    assert df >= 3, "too few well-filled cells for a chi-square test: use more runs or a peaked distribution"
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def sampled_counts(decoder: Decoder, params: SamplingParams, prompt: list[int] = PROMPT, runs: int = RUNS) -> Counter:
    """First STEPS generated tokens of `runs` seeded generations, counted."""
    counts: Counter = Counter()
    for seed in range(runs):
        out = decoder.generate(prompt, max_new_tokens=STEPS, temperature=params.temperature, top_k=params.top_k,
                               top_p=params.top_p, seed=seed)
        counts[tuple(out.token_ids)] += 1
    return counts


def wrong_verify(tree, logits, params, generator, rule=None):
    """Speculative sampling with a bug: after a rejection it samples from p instead of the residual."""
    if params.greedy:
        return verify(tree, logits, params, generator)
    p_all = probs_from_logits(logits, params)
    nodes, out = [], []
    for i, x in enumerate(tree.tokens[0].tolist()):
        p = p_all[0, i]
        q = tree.draft_probs[0, i] if tree.draft_probs is not None else torch.nn.functional.one_hot(
            torch.tensor(x), p.shape[-1]).float()
        if float(torch.rand((), generator=generator)) * float(q[x]) < float(p[x]):
            nodes.append(i)
            out.append(x)
            continue
        out.append(int(sample(p, generator)))
        break
    else:
        out.append(int(sample(p_all[0, len(out)], generator)))
    return Verdict(accepted_nodes=[nodes], tokens=[out])


SETTINGS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=5, top_p=0.9)]


@pytest.fixture(scope="module")
def models():
    target = tiny_loaded("llama", vocab_size=VOCAB, seed=0, scale=3.0)
    draft = tiny_loaded("llama", vocab_size=VOCAB, seed=3, scale=3.0, layers=1)
    return target, draft


@pytest.mark.parametrize("params", SETTINGS, ids=["t1", "t0.8-k5-p0.9"])
@pytest.mark.parametrize("method", ["ar", "pld", "draft", "draft@draft_vocab=5"])
def test_sampling_matches_target_distribution(models, method, params):
    target, draft = models
    options = {"num_draft_tokens": 2, "adaptive": False} if method != "ar" else {}
    if method == "draft@draft_vocab=5":  # drafts from ids 0-4 and the prompt's (1, 2, 3): never 5-7
        method, options = "draft", {**options, "draft_vocab": 5}
    decoder = Decoder(target, method, draft=draft if method == "draft" else None, **options)
    dist = exact_distribution(target, PROMPT, params)
    counts = sampled_counts(decoder, params)
    assert chi_square_pvalue(counts, dist, RUNS) > 1e-3


@pytest.mark.parametrize("method", ["pld", "draft"])
def test_wrong_sampler_is_caught(models, method, monkeypatch):
    target, draft = models
    params = SETTINGS[0]
    monkeypatch.setattr(step, "verify", wrong_verify)
    extra = {"confidence_threshold": 0.0} if method == "draft" else {}  # always draft 2 tokens: more to catch
    decoder = Decoder(target, method, draft=draft if method == "draft" else None, num_draft_tokens=2, adaptive=False,
                      **extra)
    counts = sampled_counts(decoder, params)
    assert chi_square_pvalue(counts, exact_distribution(target, PROMPT, params), RUNS) < 1e-6


def test_draft_acceptance_is_partial_under_sampling(models):
    """The statistical tests above exercise both acceptance and rejection of drafts."""
    target, draft = models
    decoder = Decoder(target, "draft", draft=draft, num_draft_tokens=2, adaptive=False)
    histogram = Counter()
    for seed in range(100):
        st = decoder.generate(PROMPT, max_new_tokens=STEPS, temperature=1.0, seed=seed).stats
        histogram.update(st.acceptance_histogram)
    assert histogram[0] > 0 and histogram[1] + histogram[2] > 0


def test_probs_from_logits_settings():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert torch.equal(probs_from_logits(logits, SamplingParams()), torch.tensor([[1.0, 0, 0, 0]]))
    k2 = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (k2[0, 2:] == 0).all() and torch.isclose(k2.sum(), torch.tensor(1.0))
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert p[0, 0] == 1.0  # the top token alone holds more than half of the mass
    for bad in (dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_same_seed_same_output(models):
    target, draft = models
    dec = Decoder(target, "draft", draft=draft)
    a = dec.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=5).token_ids
    b = dec.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=5).token_ids
    assert a == b


def test_gumbel_top_k_draws_distinct_possible_tokens_by_probability():
    from leapdecode.sampling import gumbel_top_k, make_generator

    q = torch.tensor([0.0, 0.6, 0.3, 0.0, 0.1])
    gen = make_generator(0)
    first = [gumbel_top_k(q, 5, gen) for _ in range(3000)]
    assert all(sorted(d) == [1, 2, 4] for d in first)  # only possible tokens, each once
    share = sum(d[0] == 1 for d in first) / len(first)
    assert abs(share - 0.6) < 0.04  # the first draw follows q
