"""The draft distribution q on the target's vocabulary (`verifiers/distributions.py`), and drafting with a
draft model whose output layer has a different number of padding rows than the target's.

Models of one tokenizer often have LM heads padded to different multiples (Qwen2.5: 151,936 rows for the small
models, 152,064 for the 7B; 151,665 tokens): q then has more or fewer entries than the target's p. The padding
rows here never win probability (a bias of -1e4 on their logits, as an untrained row of a real head almost
never does), so the target's distribution and the draft's are those of equal heads, and the verifiers must
give exactly the target's distribution whichever head is wider.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config, tiny_tokenizer
from leapdecode import Decoder, SamplingParams
from leapdecode.loading import LoadedModel
from leapdecode.tree import DraftTree
from leapdecode.verifiers import verify
from leapdecode.verifiers.distributions import accepts, draft_q, fit_vocab, residual
from test_sampling import PROMPT, RUNS, VOCAB, chi_square_pvalue, exact_distribution, sampled_counts

RUNS_HERE = RUNS // 2  # per method and pairing: enough for a peaked three-token distribution
PADDING_LOGIT = -1e4  # exp(-1e4) is 0 in float32: the padding rows have probability 0


def test_fit_vocab_pads_and_cuts():
    q = torch.tensor([0.5, 0.25, 0.25])
    assert fit_vocab(q, 5).tolist() == [0.5, 0.25, 0.25, 0.0, 0.0]
    assert fit_vocab(q, 2).tolist() == [0.5, 0.25]
    assert fit_vocab(q, 3) is q
    assert fit_vocab(torch.ones(2, 4), 6).shape == (2, 6)


def test_draft_q_is_on_the_target_vocabulary():
    p = torch.full((6,), 1 / 6)
    narrow = DraftTree.chain(torch.tensor([1, 2]), torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    assert draft_q(narrow, 0, 0, p).tolist() == [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    wide = DraftTree.chain(torch.tensor([1]), torch.full((1, 9), 1 / 9))
    assert draft_q(wide, 0, 0, p).shape == (6,)
    point = DraftTree.chain(torch.tensor([4, 7]), None)  # no probabilities: a point mass, none past the vocabulary
    assert draft_q(point, 0, 0, p).tolist() == [0, 0, 0, 0, 1, 0] and float(draft_q(point, 0, 1, p).sum()) == 0


def test_a_token_past_the_target_vocabulary_is_rejected():
    p, q = torch.full((4,), 0.25), torch.full((6,), 1 / 6)
    gen = torch.Generator().manual_seed(0)
    assert not any(accepts(p, q, 5, gen) for _ in range(50))
    assert sum(accepts(p, q, 1, gen) for _ in range(200)) == 200  # p(1) >= q(1): always accepted
    r = residual(p, fit_vocab(q, 4))
    assert torch.allclose(r, torch.full((4,), 0.25))


def test_chain_verifier_takes_a_narrower_or_wider_draft_head():
    """Speculative sampling on a chain with q of another width than p: the committed token is drawn from the
    right law (min(p, q) accepted + residual), checked against padding q by hand to the same width."""
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 6)
    params = SamplingParams(temperature=1.0)
    tokens = torch.tensor([[2, 3]])
    for width in (4, 9):
        probs = torch.rand(1, 2, width).softmax(-1)
        probs[..., 6:] = 0.0  # draft padding rows: never drawn
        probs = probs / probs.sum(-1, keepdim=True)
        padded = DraftTree(tokens=tokens, parents=(-1, 0), draft_probs=fit_vocab(probs, 6))
        tree = DraftTree(tokens=tokens, parents=(-1, 0), draft_probs=probs)
        for seed in range(30):
            a = verify(tree, logits, params, torch.Generator().manual_seed(seed))
            b = verify(padded, logits, params, torch.Generator().manual_seed(seed))
            assert (a.accepted_nodes, a.tokens) == (b.accepted_nodes, b.tokens)


def padded_head(model: torch.nn.Module, rows: int) -> torch.nn.Module:
    """A copy of `model` with `rows` output rows (and embeddings): the first ones equal to the model's, the
    rest padding rows whose logits are PADDING_LOGIT. The LM head gets a bias for that (zero on real rows)."""
    real = model.get_output_embeddings().weight.shape[0]
    cfg = copy.deepcopy(model.config)
    cfg.vocab_size = rows
    out = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in out.state_dict().items():
            if name not in own:
                continue
            if tensor.shape == own[name].shape:
                tensor.copy_(own[name])
            else:  # the vocabulary rows of the embeddings and the head
                n = min(rows, real)
                tensor[:n] = own[name][:n]
        head = out.get_output_embeddings()
        new = torch.nn.Linear(head.in_features, rows, bias=True)
        new.weight.copy_(head.weight)
        new.bias.zero_()
        old_bias = getattr(model.get_output_embeddings(), "bias", None)
        if old_bias is not None:
            new.bias[: min(rows, real)] = old_bias[: min(rows, real)]
        new.bias[real:] = PADDING_LOGIT
    out.set_output_embeddings(new)
    return out.eval()


def loaded(model: torch.nn.Module, name: str) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(VOCAB), name=name, stop_token_ids=frozenset(),
                       context_length=512)


def base_model(arch: str, seed: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, VOCAB, layers), attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)  # peaked, as in test_sampling: drafts get accepted
    return padded_head(model, VOCAB)  # the same model with a (zero) bias on its head


def head_pairs(arch: str) -> dict[str, tuple[LoadedModel, LoadedModel]]:
    """(target, draft) pairs of one tokenizer: equal heads, a wider target head, a wider draft head, both."""
    target, draft = base_model(arch, 0, 2), base_model(arch, 3, 1)
    return {
        "equal": (loaded(target, "target"), loaded(draft, "draft")),
        "wide-target": (loaded(padded_head(target, VOCAB + 4), "target-12"), loaded(draft, "draft")),
        "wide-draft": (loaded(target, "target"), loaded(padded_head(draft, VOCAB + 5), "draft-13")),
        "both-wide": (loaded(padded_head(target, VOCAB + 4), "target-12"),
                      loaded(padded_head(draft, VOCAB + 5), "draft-13")),
    }


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def heads(request):
    return head_pairs(request.param)


@pytest.fixture(scope="module")
def llama_heads():
    return head_pairs("llama")


OPTIONS = {"draft": dict(num_draft_tokens=3, adaptive=False, confidence_threshold=0.0),
           "draft-tree": dict(max_nodes=6), "spectr": dict(num_drafts=2, num_draft_tokens=2)}


@pytest.mark.parametrize("method", list(OPTIONS))
def test_heads_of_other_widths_draft_and_verify(heads, method):
    """Every pairing of head widths runs; greedy output equals ar's (lossless), and sampled tokens are the
    tokenizer's. (The same seed does not give the same sampled tokens across widths: torch's multinomial
    draws differently for a longer probability vector, zeros included; the law is checked below.)"""
    for case, (target, draft) in heads.items():
        dec = Decoder(target, method, draft=draft, **OPTIONS[method])
        ar = Decoder(target, "ar")
        for prompt in (PROMPT, [5, 1, 4, 1, 5, 1, 4]):
            greedy = dec.generate(prompt, max_new_tokens=16)
            assert greedy.token_ids == ar.generate(prompt, max_new_tokens=16).token_ids, case
            assert greedy.stats.drafted_tokens > 0
        for seed in range(8):
            out = dec.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=seed).token_ids
            assert len(out) == 12 and all(t < VOCAB for t in out), case


@pytest.mark.parametrize("case", ["wide-target", "wide-draft"])
@pytest.mark.parametrize("method", list(OPTIONS))
def test_heads_of_other_widths_keep_the_target_distribution(llama_heads, method, case):
    """Under sampling the first three tokens follow the target's exact distribution (chi-square, as in
    test_sampling) when the two heads have different numbers of padding rows."""
    target, draft = llama_heads[case]
    params = SamplingParams(temperature=1.0)
    decoder = Decoder(target, method, draft=draft, **OPTIONS[method])
    counts = sampled_counts(decoder, params, runs=RUNS_HERE)
    assert chi_square_pvalue(counts, exact_distribution(target, PROMPT, params), RUNS_HERE) > 1e-3
