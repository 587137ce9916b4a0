"""`verifiers/tree_sampling.py`: recursive rejection over a node's children is exact (chi-square on the first
two tokens of a synthetic two-level target), with children drawn with or without replacement; a wrong tree
sampler is caught by the same test."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from leapdecode import DraftTree, SamplingParams
from leapdecode.sampling import sample
from leapdecode.verifiers import Verdict
from leapdecode.verifiers.tree_sampling import verify_tree_sampling, without_replacement
from test_sampling import chi_square_pvalue
from wrong_samplers import wrong_tree_verify

# a synthetic two-level target
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
