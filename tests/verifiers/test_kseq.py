"""`verifiers/kseq.py`: SpecTr's k-sequential selection is exact on a synthetic two-level target, and its gamma
keeps the residual a distribution."""
from __future__ import annotations

from collections import Counter

import torch

from leapdecode import SamplingParams
from leapdecode.sampling import sample
from leapdecode.verifiers import verify
from leapdecode.verifiers.kseq import MultiDraftTree, kseq_gamma, kseq_residual
from test_sampling import chi_square_pvalue
from test_tree_sampling import TRIALS, first_two, logits_for, synthetic, two_token_distribution


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
