"""Lossless methods produce exactly plain greedy decoding's tokens, and the cache stays exact."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

import leapdecode
from leapdecode import Decoder, DraftTree
from leapdecode.drafters.base import DraftContext, DraftFeedback, Drafter
from leapdecode.errors import InvalidSettingError
from conftest import ARCHITECTURES, tiny_loaded

N_PROMPTS = 6


def random_prompts(seed: int, n: int = N_PROMPTS, vocab: int = 64) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        length = rng.randint(1, 24)
        if i % 2:  # repetitive prompts give prompt lookup something to copy
            base = [rng.randrange(1, vocab) for _ in range(rng.randint(2, 5))]
            prompts.append((base * 10)[:length + 8])
        else:
            prompts.append([rng.randrange(1, vocab) for _ in range(length)])
    return prompts


def test_ar_matches_transformers_generate(arch):
    target = tiny_loaded(arch, scale=4.0)
    dec = Decoder(target, "ar")
    for prompt in random_prompts(1):
        ours = dec.generate(prompt, max_new_tokens=24).token_ids
        ids = torch.tensor([prompt])
        ref = target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                    min_new_tokens=24, pad_token_id=0)
        assert ours == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("options", [{}, {"num_draft_tokens": 3, "max_ngram": 2}, {"adaptive": True, "min_ngram": 2},
                                     {"occurrence": "earliest", "max_ngram": 2}])
def test_pld_greedy_equals_ar(arch, options):
    target = tiny_loaded(arch, scale=6.0)
    ar, pld = Decoder(target, "ar"), Decoder(target, "pld", **options)
    accepted = 0
    for prompt in random_prompts(2):
        ref = ar.generate(prompt, max_new_tokens=40)
        out = pld.generate(prompt, max_new_tokens=40)
        assert out.token_ids == ref.token_ids
        assert out.stats.new_tokens == 40
        accepted += sum(out.stats.accept_lengths) - len(out.stats.accept_lengths)
    assert accepted > 0  # the repetitive prompts made prompt lookup accept something


@pytest.mark.parametrize("draft_seed,expect", [(0, "full"), (1, "partial"), (7, "partial")])
def test_draft_greedy_equals_ar(arch, draft_seed, expect):
    target = tiny_loaded(arch, scale=6.0)
    draft = tiny_loaded(arch, seed=draft_seed, scale=6.0, layers=1 if draft_seed else 2)
    ar, spec = Decoder(target, "ar"), Decoder(target, "draft", draft=draft, num_draft_tokens=4)
    for prompt in random_prompts(3):
        ref = ar.generate(prompt, max_new_tokens=32)
        out = spec.generate(prompt, max_new_tokens=32)
        assert out.token_ids == ref.token_ids
        if expect == "full":  # the target drafting for itself: every draft accepted
            assert out.stats.acceptance_rate == 1.0


def test_stop_token_ends_generation_identically(arch):
    target = tiny_loaded(arch, scale=6.0)
    ref_free = Decoder(target, "ar").generate(random_prompts(4)[1], max_new_tokens=30).token_ids
    stop = ref_free[12]
    target = tiny_loaded(arch, scale=6.0, stop_token_ids=[stop])
    methods = [("ar", {}), ("pld", {}), ("draft", {"draft": target}), ("self-spec", {"draft_layers": 1})]
    methods += [(m, {}) for m in ("pld-tree", "aded", "stand", "lookahead")]
    methods += [(m, {"draft": target}) for m in ("draft-tree", "spectr")]
    for method, kw in methods:
        out = Decoder(target, method, **kw).generate(random_prompts(4)[1], max_new_tokens=30)
        assert out.token_ids == ref_free[: ref_free.index(stop) + 1]
        assert out.stats.stop_reason == "eos"


class ScriptedDrafter(Drafter):
    """Knows the reference output; proposes a tree whose correct path is cut at a scripted point and
    checks, before each proposal, that the target cache equals plain decoding's cache of the same text."""

    def __init__(self, decoder: Decoder, reference: list[int], seed: int, branching: bool):
        self.decoder, self.reference, self.rng, self.branching = decoder, reference, random.Random(seed), branching
        self.vocab = decoder.target.vocab_size
        self.checked = 0

    def begin(self, prompt, params):
        self.prompt_len = len(prompt)

    def _assert_cache_exact(self, tokens: list[int]) -> None:
        cache = DynamicCache()
        with torch.inference_mode():
            self.decoder.target.model(input_ids=torch.tensor([tokens[:-1]]), cache=cache, use_cache=True)
        ours = self.decoder.lm.cache
        assert ours.get_seq_length() == len(tokens) - 1
        for mine, ref in zip(ours.layers, cache.layers):
            torch.testing.assert_close(mine.keys, ref.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mine.values, ref.values, atol=1e-5, rtol=1e-4)
        self.checked += 1

    def propose(self, ctx: DraftContext):
        if len(ctx.tokens) == self.prompt_len:  # the prompt is fed with the first verification pass
            assert self.decoder.lm.length == 0
        else:
            self._assert_cache_exact(ctx.tokens)
        done = len(ctx.tokens) - self.prompt_len
        truth = self.reference[done : done + min(ctx.max_tokens, self.rng.randint(1, 6))]  # what the target will accept
        if not truth:
            return None
        pattern = self.rng.choice(["full", "partial", "never"])
        keep = {"full": len(truth), "partial": self.rng.randint(1, len(truth)), "never": 0}[pattern]
        chain = truth[:keep] + [(t + 1) % self.vocab for t in truth[keep : keep + 1]]
        chain = chain[: ctx.max_tokens]
        if not self.branching or len(chain) < 2 or ctx.max_tokens < len(chain) + 2:
            return DraftTree.chain(torch.tensor(chain))
        # a tree: a wrong sibling first, then the scripted chain, with an extra wrong leaf off its middle
        wrong = (chain[0] + 3) % self.vocab
        if wrong == truth[0]:
            wrong = (wrong + 1) % self.vocab
        tokens = [wrong] + chain + [(chain[0] + 5) % self.vocab]
        parents = [-1, -1] + list(range(1, len(chain))) + [1]
        return DraftTree(tokens=torch.tensor([tokens]), parents=tuple(parents))

    def update(self, feedback: DraftFeedback):
        pass


@pytest.mark.parametrize("branching", [False, True])
def test_cache_equals_plain_decoding_after_any_accept_pattern(arch, branching):
    target = tiny_loaded(arch, scale=3.0)
    for i, prompt in enumerate(random_prompts(5, n=3)):
        reference = Decoder(target, "ar").generate(prompt, max_new_tokens=30).token_ids
        dec = Decoder(target, "ar")
        dec.drafter = ScriptedDrafter(dec, reference, seed=i, branching=branching)
        out = dec.generate(prompt, max_new_tokens=30)
        assert out.token_ids == reference
        assert dec.drafter.checked >= 3
        assert max(out.stats.accept_lengths) > 1


def test_all_registered_lossless_methods_listed():
    names = {m.name for m in leapdecode.all_methods()}
    assert {"ar", "pld", "draft"} <= names
    assert all(m.promise in ("lossless", "lossy") for m in leapdecode.all_methods())


def test_draft_vocabulary_keeps_greedy_output(arch):
    """`draft_vocab`: the draft reads only its first ids' LM-head rows (plus the prompt's and the end tokens);
    the draft model's hidden-state path gives exactly its logits there, and the output stays ar's."""
    from leapdecode.drafters.draft_model import DraftModelDrafter
    from leapdecode.lm import CausalLM

    target = tiny_loaded(arch, scale=6.0)
    draft = tiny_loaded(arch, seed=1, scale=6.0, layers=1)
    lm = CausalLM(draft.model)
    with torch.inference_mode():
        full = lm.forward(torch.tensor([[1, 2, 3]]))[:, -1]
        lm.reset()
        head = draft.model.get_output_embeddings()
        torch.testing.assert_close(head(lm.forward_hidden(torch.tensor([[1, 2, 3]])))[:, -1], full)
    ar = Decoder(target, "ar")
    dec = Decoder(target, "draft", draft=draft, draft_vocab=40, num_draft_tokens=4)
    assert isinstance(dec.drafter, DraftModelDrafter) and dec.drafter.vocab is not None
    drafted = 0
    for prompt in random_prompts(5, n=6):
        out = dec.generate(prompt, max_new_tokens=20)
        assert out.token_ids == ar.generate(prompt, max_new_tokens=20).token_ids
        drafted += out.stats.drafted_tokens
    assert drafted > 0
    assert Decoder(target, "draft", draft=draft).drafter.vocab is None  # the default: the full vocabulary
    with pytest.raises(InvalidSettingError):
        Decoder(target, "draft", draft=draft, draft_vocab=-1)
