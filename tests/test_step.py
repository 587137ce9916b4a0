"""The decoding step's stages on their own (step.py): the budget of a proposal, stop handling, the width
policy's cut of a batch, and a failing row isolated from the others. A scripted scorer stands in for the
target: its argmax after any token t is t + 1."""
from __future__ import annotations

import pytest
import torch

from leapdecode import DraftTree
from leapdecode.draft_cut import DraftCut, DraftHistory
from leapdecode.drafters.base import Drafter
from leapdecode.errors import LeapdecodeError
from leapdecode.step import Sequence, decode_step, propose, settings
from conftest import tiny_tokenizer

VOCAB = 64


class Counting(Drafter):
    """Drafts t+1, t+2, ... (what the scripted target accepts), as many as `length` and the budget allow."""

    def __init__(self, length: int = 3, wrong_after: int | None = None):
        self.length, self.wrong_after, self.budgets = length, wrong_after, []

    def propose(self, ctx):
        self.budgets.append(ctx.max_tokens)
        last = ctx.tokens[-1]
        tokens = [(last + i) % VOCAB for i in range(1, min(self.length, ctx.max_tokens) + 1)]
        if self.wrong_after is not None:
            tokens = [t if i < self.wrong_after else (t + 7) % VOCAB for i, t in enumerate(tokens)]
        return DraftTree.chain(torch.tensor(tokens))


class Scripted:
    """A `step.Scorer` whose logits after token t put their argmax on t + 1."""

    prompt_pending = False

    def __init__(self):
        self.widths, self.accepted = [], []

    def score(self, roots, trees, hidden):
        q = 1 + max(t.size for t in trees)
        logits = torch.zeros(len(trees), q, VOCAB)
        for b, (root, tree) in enumerate(zip(roots, trees)):
            fed = [root] + tree.tokens[0].tolist()
            for i, t in enumerate(fed):
                logits[b, i, (t + 1) % VOCAB] = 1.0
        self.widths.append(q)
        return logits, None

    def commit(self, accepted):
        self.accepted.append(accepted)


def _row(drafter: Drafter, prompt=(1, 2, 3), stop_ids=(), history=None, context=512, **kw) -> Sequence:
    return Sequence.begin(list(prompt), settings(**kw), drafter, method="test", tokenizer=tiny_tokenizer(VOCAB),
                          stop_ids=stop_ids, context_length=context, history=history)


def test_budget_leaves_room_for_the_target_token_and_the_batch_cap_binds_greedy_rows_only():
    row = _row(Counting(length=10), max_new_tokens=5)
    assert propose(row).size == 4 and propose(row, cap=2).size == 2
    sampled = _row(Counting(length=10), max_new_tokens=5, temperature=0.8, seed=1)
    assert propose(sampled, cap=2).size == 4  # seeded output must equal a lone run: its own budget
    last = _row(Counting(), max_new_tokens=1)
    assert propose(last).size == 0 and last.drafter.budgets == []  # nothing to draft: not even asked

    class Greedy(Drafter):
        def propose(self, ctx):
            return DraftTree.chain(torch.arange(ctx.max_tokens + 1))

    with pytest.raises(LeapdecodeError, match="over its budget"):
        propose(_row(Greedy(), max_new_tokens=4))


def test_a_chain_is_cut_after_its_first_end_token():
    row = _row(Counting(length=6), stop_ids=[6])
    assert propose(row).tokens.tolist() == [[4, 5, 6]]


def test_stops_limit_end_token_and_stop_string():
    scorer = Scripted()
    row = _row(Counting(length=3), max_new_tokens=6)
    while not row.finished:
        decode_step([row], scorer)
    assert row.ids == [4, 5, 6, 7, 8, 9] and row.stats.stop_reason == "max_new_tokens"
    assert row.stats.accept_lengths == [4, 2] and row.stats.target_forward_passes == 2  # the last draft fits
    row = _row(Counting(length=3), stop_ids=[6], max_new_tokens=20)
    decode_step([row], scorer)
    assert row.new == [4, 5, 6] and row.finished and row.stats.stop_reason == "eos"
    row = _row(Counting(length=3), max_new_tokens=20, stop=["w6"])
    decode_step([row], scorer)
    assert row.text.text == "w4 w5 " and row.ids == [4, 5, 6]  # the text is cut; the token that ended it kept
    assert row.finished and row.stats.stop_reason == "stop_string"
    row = _row(Counting(length=3), context=6, max_new_tokens=20)  # 3 prompt tokens, context 6: 3 new ones
    while not row.finished:
        decode_step([row], scorer)
    assert len(row.ids) == 3 and row.stats.stop_reason == "context"


def test_a_failing_row_is_recorded_and_the_others_go_on():
    class Broken(Drafter):
        def propose(self, ctx):
            raise RuntimeError("no draft")

    good, bad = _row(Counting(length=2)), _row(Broken())
    errors: dict[int, str] = {}
    scorer = Scripted()
    decode_step([good, bad], scorer, errors=errors)
    assert errors == {1: "RuntimeError: no draft"}
    assert good.new == [4, 5, 6] and bad.new == [] and scorer.accepted == [[[0, 1], []]]
    with pytest.raises(RuntimeError, match="no draft"):  # without `errors`, the error propagates
        decode_step([_row(Broken())], scorer)


def test_the_width_policy_cuts_every_greedy_row_to_one_width():
    """With pass times that make every drafted position dear, the cut keeps no draft; a sampled row's draft
    is never cut and sets the least width of the pass."""
    cut = DraftCut()
    for width in range(1, 65):
        cut.costs.observe(width, 1.0 + width)
        cut.fresh.add(width)
    cut.overhead = 0.0
    cut.observe = lambda *args: None  # keep these pass times (the scripted passes take no time)
    rows = [_row(Counting(length=3, wrong_after=0), history=DraftHistory()) for _ in range(2)]
    scorer = Scripted()
    for _ in range(30):  # drafts that always miss: the cut learns to drop them
        decode_step(rows, scorer, cut)
    assert scorer.widths[-1] == 1
    sampled = _row(Counting(length=3), temperature=0.5, seed=3, history=DraftHistory())
    decode_step(rows + [sampled], scorer, cut)
    assert scorer.widths[-1] == 4  # the sampled row keeps its three nodes; the greedy ones may use them too
