"""Token trees: layout compilation, one-pass tree scoring equals sequential decoding, KV compaction, and
the exactness of the tree-sampling verifiers (recursive rejection; SpecTr k-sequential)."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from transformers import DynamicCache

from leapdecode import DraftTree, SamplingParams
from leapdecode.lm import CausalLM
from leapdecode.sampling import sample
from leapdecode.tree import compile_layout
from leapdecode.verifiers import Verdict, verify
from leapdecode.verifiers.kseq import MultiDraftTree, kseq_gamma, kseq_residual, verify_kseq
from leapdecode.verifiers.tree_sampling import verify_tree_sampling, without_replacement
from conftest import tiny_loaded
from test_sampling import chi_square_pvalue

# logits of a node scored inside a tree vs. the same path decoded token by token (float32, SDPA)
ATOL, RTOL = 1e-4, 1e-4


# ----- layout ---------------------------------------------------------------------------------------
def test_compile_hand_drawn_tree():
    #        root
    #       /    \
    #      0      1
    #     / \     |
    #    2   3    4
    #    |
    #    5
    layout = compile_layout((-1, -1, 0, 0, 1, 2))
    assert layout.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert layout.children == ((0, 1), (2, 3), (4,), (5,), (), (), ())
    assert layout.paths == ((0, 3), (1, 4), (0, 2, 5))  # in leaf order
    assert not layout.is_chain
    expected = torch.zeros(7, 7, dtype=torch.bool)
    rows = {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 4], 5: [0, 2, 5], 6: [0, 1, 3, 6]}
    for q, ks in rows.items():
        expected[q, ks] = True
    assert torch.equal(layout.ancestor_mask, expected)
    with pytest.raises(ValueError):
        compile_layout((-1, 2, 0))


def test_chain_and_medusa_paths():
    chain = DraftTree.chain(torch.tensor([5, 6, 7]))
    assert chain.layout.is_chain and chain.layout.paths == ((0, 1, 2),)
    assert chain.layout.depths.tolist() == [0, 1, 2, 3]
    tree = DraftTree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], torch.tensor([10, 11, 12, 13, 14, 15]))
    assert tree.parents == (-1, -1, 0, 0, 1, 2)
    assert tree.tokens[0].tolist() == [10, 11, 12, 13, 14, 15]
    assert tree.path_tokens([0, 2, 5]) == [10, 12, 15]


def random_tree(rng: random.Random, n: int, vocab: int) -> DraftTree:
    parents = [-1] + [rng.randrange(-1, i) for i in range(1, n)]
    return DraftTree(tokens=torch.tensor([[rng.randrange(vocab) for _ in range(n)]]), parents=tuple(parents))


def path_of(tree: DraftTree, node: int) -> list[int]:
    path = []
    while node != -1:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


# ----- scoring and compaction -----------------------------------------------------------------------
@pytest.mark.parametrize("prefix_len", [3, 11])
@pytest.mark.parametrize("lead", [0, 3, -1], ids=["cached-prefix", "part-fed-with-tree", "all-fed-with-tree"])
def test_tree_scoring_equals_sequential_decoding(arch, prefix_len, lead):
    """Every node's logits from one tree pass equal those of decoding its path token by token (gemma3 with
    a sliding window of 6, crossed by the longer prefix); also when the last `lead` prefix tokens before the
    root are fed in the same pass (the engine's first step feeds the whole prompt so)."""
    target = tiny_loaded(arch)
    rng = random.Random(prefix_len)
    prefix = [rng.randrange(64) for _ in range(prefix_len)]
    tree = random_tree(rng, 9, 64)
    cached = len(prefix) - 1 - (min(lead, len(prefix) - 1) if lead >= 0 else len(prefix) - 1)
    with torch.inference_mode():
        lm = CausalLM(target.model)
        if cached:
            lm.forward(torch.tensor([prefix[:cached]]))
        logits = lm.score_tree(torch.tensor([prefix[cached:]]), tree)[0]  # (N+1, V)
        assert lm.length == len(prefix) + tree.size
        for row in range(tree.size + 1):
            path = tree.path_tokens(path_of(tree, row - 1)) if row else []
            ref = target.model(input_ids=torch.tensor([prefix + path])).logits[0, -1]
            torch.testing.assert_close(logits[row], ref, atol=ATOL, rtol=RTOL)


def test_keep_path_equals_plain_cache(arch):
    target = tiny_loaded(arch)
    rng = random.Random(3)
    for trial in range(4):
        prefix = [rng.randrange(64) for _ in range(rng.randint(2, 12))]
        tree = random_tree(rng, 8, 64)
        leaf = rng.randrange(-1, tree.size)
        nodes = path_of(tree, leaf)
        with torch.inference_mode():
            lm = CausalLM(target.model)
            lm.forward(torch.tensor([prefix[:-1]]))
            start = lm.length
            lm.score_tree(torch.tensor([[prefix[-1]]]), tree)
            lm.keep_path(start, nodes)
            cache = DynamicCache()
            target.model(input_ids=torch.tensor([prefix + tree.path_tokens(nodes)]), cache=cache, use_cache=True)
        assert lm.length == len(prefix) + len(nodes)
        for mine, ref in zip(lm.cache.layers, cache.layers):
            torch.testing.assert_close(mine.keys, ref.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mine.values, ref.values, atol=1e-5, rtol=1e-4)


# ----- verifier exactness on a synthetic two-level target ---------------------------------------------
V = 6
TRIALS = 2500


def synthetic(seed: int):
    g = torch.Generator().manual_seed(seed)
    p_root = torch.rand(V, generator=g).pow(2).softmax(-1) * 0 + torch.rand(V, generator=g)
    p_root /= p_root.sum()
    q = torch.rand(V, generator=g) ** 3
    q /= q.sum()
    p_next = torch.rand(V, V, generator=g)
    p_next /= p_next.sum(-1, keepdim=True)
    return p_root, q, p_next


def two_token_distribution(p_root, p_next) -> dict:
    return {(a, b): float(p_root[a] * p_next[a, b]) for a in range(V) for b in range(V)}


def make_tree(q, p_next, k, replacement, gen):
    """Root children: k tokens from q (with or without replacement); each child gets one grandchild drawn
    from p_next-ish draft (a flattened q) so accepted paths reach depth 2."""
    if replacement:
        first = [int(sample(q, gen)) for _ in range(k)]
        conds = q.expand(k, V)
    else:
        u = torch.rand(V, generator=gen).clamp_min(1e-20)
        first = torch.topk(q.log() - torch.log(-torch.log(u)), k).indices.tolist()
        conds = without_replacement(q, first)
    q2 = (q + 0.1) / (q + 0.1).sum()
    second = [int(sample(q2, gen)) for _ in range(k)]
    tokens = first + second
    parents = [-1] * k + list(range(k))
    probs = torch.cat([conds, q2.expand(k, V)]).unsqueeze(0)
    return DraftTree(tokens=torch.tensor([tokens]), parents=tuple(parents), draft_probs=probs)


def logits_for(tree, p_root, p_next):
    rows = [p_root] + [p_next[t] for t in tree.tokens[0].tolist()[: tree.size]]
    # rows after depth-2 nodes are not needed for two tokens; use the parent's row (any distribution works)
    rows = [p_root] + [p_next[t] if tree.parents[i] == -1 else p_root for i, t in enumerate(tree.tokens[0].tolist())]
    return torch.stack(rows).log().unsqueeze(0)


def first_two(verdict: Verdict, tree: DraftTree, p_next, gen) -> tuple[int, int]:
    out = verdict.tokens[0]
    if len(out) >= 2:
        return out[0], out[1]
    return out[0], int(sample(p_next[out[0]], gen))  # finish the second token from the exact target


def wrong_tree_verify(tree, logits, params, generator):
    """Recursive rejection with bugs: after a rejected child the next sibling is tried against the unchanged
    target distribution p, and after the last rejection the token is drawn from p, not from the residual."""
    from leapdecode.sampling import probs_from_logits

    p_all = probs_from_logits(logits, params)
    drafted = tree.tokens[0].tolist()
    nodes, at = [], 0
    while True:
        p = p_all[0, at]
        chosen = None
        for c in tree.layout.children[at]:
            q = tree.draft_probs[0, c] if tree.draft_probs is not None else torch.nn.functional.one_hot(
                torch.tensor(drafted[c]), p.shape[-1]).float()
            x = drafted[c]
            if float(torch.rand((), generator=generator)) * float(q[x]) < float(p[x]):
                chosen = c
                break
        if chosen is None:
            break
        nodes.append(chosen)
        at = chosen + 1
    p = p_all[0, at]  # and after rejecting every child it samples from p itself, not from the residual
    return Verdict(accepted_nodes=[nodes], tokens=[[drafted[n] for n in nodes] + [int(sample(p, generator))]])


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
def test_tree_sampling_verifier_is_exact(replacement):
    p_root, q, p_next = synthetic(1)
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    counts, accepted = Counter(), Counter()
    for _ in range(TRIALS):
        tree = make_tree(q, p_next, 3, replacement, gen)
        verdict = verify_tree_sampling(tree, logits_for(tree, p_root, p_next), params, gen)
        accepted[len(verdict.accepted_nodes[0])] += 1
        counts[first_two(verdict, tree, p_next, gen)] += 1
    assert chi_square_pvalue(counts, two_token_distribution(p_root, p_next), TRIALS) > 1e-3
    assert accepted[0] and accepted[1] and accepted[2]  # rejections, partial and full acceptance all happen


def test_wrong_tree_sampler_is_caught():
    p_root, q, p_next = synthetic(1)
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    counts = Counter()
    for _ in range(TRIALS):
        tree = make_tree(q, p_next, 3, True, gen)
        verdict = wrong_tree_verify(tree, logits_for(tree, p_root, p_next), params, gen)
        counts[first_two(verdict, tree, p_next, gen)] += 1
    assert chi_square_pvalue(counts, two_token_distribution(p_root, p_next), TRIALS) < 1e-6


def test_kseq_verifier_is_exact():
    p_root, q, p_next = synthetic(2)
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    q2 = (q + 0.1) / (q + 0.1).sum()
    counts, accepted = Counter(), Counter()
    for _ in range(TRIALS):
        drafts = [[int(sample(q, gen)), int(sample(q2, gen))] for _ in range(3)]
        tokens, parents, probs, paths, index = [], [], [], [], {}
        for d in drafts:
            at, path = -1, []
            for depth, t in enumerate(d):
                key = (at, t)
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(t)
                    parents.append(at)
                    probs.append(q if depth == 0 else q2)
                at = index[key]
                path.append(at)
            paths.append(tuple(path))
        tree = MultiDraftTree(tokens=torch.tensor([tokens]), parents=tuple(parents),
                              draft_probs=torch.stack(probs).unsqueeze(0), drafts=tuple(paths))
        verdict = verify(tree, logits_for(tree, p_root, p_next), params, gen)
        accepted[len(verdict.accepted_nodes[0])] += 1
        counts[first_two(verdict, tree, p_next, gen)] += 1
    assert chi_square_pvalue(counts, two_token_distribution(p_root, p_next), TRIALS) > 1e-3
    assert accepted[0] and accepted[1] and accepted[2]


def test_kseq_gamma_keeps_residual_nonnegative():
    p_root, q, _ = synthetic(3)
    for m in (1, 2, 4, 8):
        gamma = kseq_gamma(p_root, q, m)
        assert 1.0 <= gamma <= m
        beta = float(torch.minimum(q, p_root / gamma).sum())
        assert (1 - (1 - beta) ** m) / beta <= gamma * (1 + 1e-5)
        assert torch.isclose(kseq_residual(p_root, q, m, gamma).sum(), torch.tensor(1.0))


def test_chain_is_cut_after_its_first_end_token():
    probs = torch.rand(5, 7)
    chain = DraftTree.chain(torch.tensor([4, 2, 9, 2, 3]), probs)
    cut = chain.cut_after_stop({9, 3})
    assert cut.tokens.tolist() == [[4, 2, 9]] and torch.equal(cut.draft_probs[0], probs[:3])
    assert chain.cut_after_stop({8}) is chain and chain.cut_after_stop(set()) is chain
    tree = DraftTree(tokens=torch.tensor([[9, 1, 2]]), parents=(-1, -1, 1))
    assert tree.cut_after_stop({9}) is tree  # only chains are cut
    from leapdecode.verifiers.kseq import MultiDraftTree

    same = MultiDraftTree(tokens=torch.tensor([[4, 9, 2]]), parents=(-1, 0, 1), draft_probs=torch.rand(1, 3, 7),
                          drafts=((0, 1, 2), (0, 1, 2)))
    assert same.cut_after_stop({9}) is same  # k coinciding drafts keep the multi-draft rule
    assert same.prefix(1) is same  # nor does the engine's draft cut shorten them


def test_draw_children_from_a_small_support():
    """The model-free tree drafters draw children from a few ids without a vocabulary-sized vector: greedy
    takes the heaviest ids; sampling draws without replacement with the conditionals the verifier needs
    (equal to `without_replacement` on the full vector), and its draws follow q."""
    from leapdecode.drafters.trie import draw_children

    V, support, weights = 12, [7, 2, 9, 4, 11, 0], [0.1, 0.4, 0.3, 0.0, 0.15, 0.05]
    greedy = draw_children(support, weights, 3, False, None, V)
    assert greedy.tokens == [2, 9, 11] and greedy.conditionals is None
    assert draw_children(support, weights, 9, False, None, V).tokens == [2, 9, 11, 7, 0]  # zero weight never drawn
    q = torch.zeros(V)
    q[torch.tensor(support)] = torch.tensor(weights)
    gen = torch.Generator().manual_seed(0)
    firsts = Counter()
    for _ in range(TRIALS):
        drawn = draw_children(support, weights, 2, True, gen, V)
        assert len(set(drawn.tokens)) == 2 and 4 not in drawn.tokens
        assert torch.allclose(drawn.conditionals, without_replacement(q, drawn.tokens), atol=1e-6)
        firsts[drawn.tokens[0]] += 1
    assert chi_square_pvalue(firsts, {t: float(q[t]) for t in (7, 2, 9, 11, 0)}, TRIALS) > 1e-3
