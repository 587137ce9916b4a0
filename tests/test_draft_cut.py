"""The cost-aware draft cut: it keeps a prefix of the draft tree chosen from measured pass times and learnt
accept rates, and greedy output stays plain decoding's whatever it keeps."""
from __future__ import annotations

import random

import pytest
import torch

from leapdecode import Decoder, DraftTree
from leapdecode.draft_cut import DraftCut, DraftHistory, PassCosts
from conftest import tiny_loaded
from test_exactness import random_prompts


def test_pass_costs_interpolate_and_assume_no_dearer_beyond_the_widest():
    costs = PassCosts()
    assert costs.estimate(3) is None
    costs.observe(2, 0.010)
    costs.observe(6, 0.030)
    assert costs.estimate(4) == pytest.approx(0.020)
    assert costs.estimate(1) == pytest.approx(0.010) and costs.estimate(20) == pytest.approx(0.030)
    costs.observe(2, 0.020)  # a running mean
    assert 0.010 < costs.estimate(2) < 0.020
    costs.observe(3, 0.005)  # a narrower pass is never priced above a wider one
    assert costs.estimate(2) == pytest.approx(0.005) and costs.estimate(1) == pytest.approx(0.005)


def _measured(cut: DraftCut, seconds_of) -> None:
    for width in range(1, 65):
        cut.costs.observe(width, seconds_of(width))
        cut.fresh.add(width)
    cut.overhead = 0.0


def test_choose_follows_the_cost_curve_and_the_accept_rates():
    chain = DraftTree.chain(torch.arange(1, 11))
    cut, history = DraftCut(), DraftHistory(hot=True)
    _measured(cut, lambda w: 1.0)  # a flat curve (a GPU): keep every node
    assert cut.choose([chain], [history]) == 10
    cpu = lambda w: 1.0 + (0.05 * w if w <= 3 else 0.6 + 0.05 * w)  # noqa: E731 (a CPU: 4+ positions jump)
    cut, history = DraftCut(), DraftHistory()
    _measured(cut, cpu)
    for _ in range(50):  # drafts whose first token always misses: verifying them never pays
        history.observe(chain, [99])
    assert cut.choose([chain], [history]) == 0
    cut, history = DraftCut(), DraftHistory()
    _measured(cut, cpu)
    for _ in range(50):  # drafts that are always accepted whole: the long pass pays
        history.observe(chain, list(range(1, 12)))
    assert cut.choose([chain], [history]) == 10
    cut, history = DraftCut(), DraftHistory()
    _measured(cut, cpu)
    for _ in range(50):  # the first two tokens accepted half of the time, never the third
        history.observe(chain, [1, 2, 99])
        history.observe(chain, [99])
    assert cut.choose([chain], [history]) == 2


def test_ladder_measures_small_widths_after_a_missed_draft():
    """Until pass times are known the whole draft is kept; after a missed draft, the ladder's smallest width
    not yet measured is tried (1 position: no draft), then the next; a matched draft skips the ladder."""
    chain = DraftTree.chain(torch.arange(1, 11))
    cut, history = DraftCut(), DraftHistory()
    assert cut.choose([chain], [history]) == 0  # cold: measure one position first
    cut.observe(1, 0.01, 0.0)
    assert cut.choose([chain], [history]) == 1  # then two positions
    history.hot = True
    assert cut.choose([chain], [history]) == 10  # widths above two not measured: keep the draft whole


def test_batch_width_counts_every_row_and_the_padded_pass():
    """In a batch, one width serves every cuttable draft; a pass costs what its padded positions
    (rows x (1 + widest draft)) cost, and the drafts that are not cut set the least width."""
    good, bad = DraftTree.chain(torch.arange(1, 9)), DraftTree.chain(torch.arange(1, 9))
    sure, never = DraftHistory(hot=True), DraftHistory(hot=True)
    for _ in range(50):
        sure.observe(good, list(range(1, 10)))
        never.observe(bad, [99])
    cut = DraftCut()
    _measured(cut, lambda w: 1.0 + 0.1 * w)  # positions cost: each one a tenth of a pass
    alone = cut.choose([bad], [never], rows=1)
    assert alone == 0
    assert cut.choose([good, bad], [sure, never], rows=2) > 0  # the sure row's tokens pay for the width
    # another row already needs 8 positions: widths up to 8 cost nothing more, so the sure row keeps them
    assert cut.choose([good], [sure], rows=2, fixed=8) == 8


def test_cut_nodes_still_teach_the_accept_rates():
    """Only the first node was verified, but the target's own token after it matches the second drafted
    one: the slot at depth 2 learns a hit, the one at depth 3 learns nothing. Slots are kept apart by
    whether the previous draft matched."""
    history = DraftHistory()
    proposed = DraftTree.chain(torch.tensor([5, 6, 7]))
    rate = history.rates.rate
    history.observe(proposed, [5, 6])
    prior = rate((0, False, 3, 0))
    assert rate((0, False, 1, 0)) > prior and rate((0, False, 2, 0)) > prior
    assert history.hot
    branching = DraftTree(tokens=torch.tensor([[4, 5, 6]]), parents=(-1, -1, 1))
    history.observe(branching, [5, 9])  # nothing verified; the second child matches, its child not
    assert rate((0, True, 1, 0)) < prior < rate((0, True, 1, 1)) and rate((0, True, 2, 0)) < prior
    history.observe(DraftTree.chain(torch.tensor([8])), [3])
    assert not history.hot


def test_prefix_keeps_a_tree_and_its_earlier_siblings():
    probs = torch.rand(1, 4, 8)
    tree = DraftTree(tokens=torch.tensor([[1, 2, 3, 4]]), parents=(-1, -1, 0, 2), draft_probs=probs)
    cut = tree.prefix(3)
    assert cut.parents == (-1, -1, 0) and cut.tokens.tolist() == [[1, 2, 3]]
    assert torch.equal(cut.draft_probs, probs[:, :3])
    assert tree.prefix(9) is tree and tree.prefix(0).size == 0


@pytest.mark.parametrize("method", ["pld", "pld-tree", "aded", "stand", "lookahead", "draft", "draft-tree"])
def test_any_cut_keeps_greedy_output(arch, method):
    """Whatever prefix the cut keeps (here a random one each step), greedy output equals ar's."""
    target = tiny_loaded(arch, scale=6.0)
    draft = tiny_loaded(arch, seed=1, scale=6.0, layers=1) if method.startswith("draft") else None
    ar = Decoder(target, "ar", fit_width=False)
    dec = Decoder(target, method, draft=draft, **({"confidence_threshold": 0.0} if method == "draft" else {}))
    rng = random.Random(0)
    kept = []

    def choose(trees, histories, rows=1, fixed=0):
        kept.append(rng.randint(0, trees[0].size))
        return kept[-1]

    dec.cut.choose = choose
    for prompt in random_prompts(11, n=4):
        assert dec.generate(prompt, max_new_tokens=24).token_ids == ar.generate(prompt, max_new_tokens=24).token_ids
    assert kept and min(kept) == 0 and max(kept) > 1


def test_sampled_drafts_are_not_cut():
    target = tiny_loaded("llama", scale=3.0)
    dec = Decoder(target, "pld")
    dec.cut.choose = lambda *args, **kw: pytest.fail("a sampled draft was cut")
    dec.generate([3, 4, 5, 3, 4, 5, 3, 4], max_new_tokens=12, temperature=0.8, seed=1)
    assert Decoder(target, "pld", fit_width=False).cut is None
