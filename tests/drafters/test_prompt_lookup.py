"""Prompt lookup's match search (drafters/prompt_lookup.py): longest n-gram first, then the most recent or the
earliest occurrence; bad settings refused."""
from __future__ import annotations

import numpy as np
import pytest

from leapdecode.drafters.prompt_lookup import PromptLookupDrafter, find_continuation

# "1 2 3" occurs twice before the suffix: at 0 (followed by 4 5 6) and at 6 (followed by 7 8 9)
TOKENS = np.array([1, 2, 3, 4, 5, 6, 1, 2, 3, 7, 8, 9, 0, 1, 2, 3])


def test_most_recent_occurrence_by_default():
    draft, n = find_continuation(TOKENS, 1, 3, 3)
    assert n == 3 and draft.tolist() == [7, 8, 9]


def test_earliest_occurrence_when_asked():
    draft, n = find_continuation(TOKENS, 1, 3, 3, earliest=True)
    assert n == 3 and draft.tolist() == [4, 5, 6]


def test_longest_ngram_first_and_none_without_a_match():
    draft, n = find_continuation(np.array([5, 3, 9, 4, 3]), 1, 3, 2, earliest=True)
    assert n == 1 and draft.tolist() == [9, 4]
    assert find_continuation(np.array([1, 2, 3]), 1, 2, 4) is None


def test_unknown_occurrence_refused():
    with pytest.raises(ValueError, match="occurrence"):
        PromptLookupDrafter(occurrence="latest")


def test_longest_context_occurrence():
    from leapdecode.drafters.prompt_lookup import find_longest_context

    # "3" occurs at 2, 4 and 9; the context "1 2 3" at the end agrees with position 2's for 3 tokens, with
    # 9's ("8 2 3") for 2 and with 4's ("4 3") for 1: position 2's continuation wins though it is the oldest
    tokens = np.array([1, 2, 3, 4, 3, 6, 6, 8, 2, 3, 5, 1, 2, 3])
    draft, n = find_longest_context(tokens, 1, 2)
    assert n == 3 and draft.tolist() == [4, 3]
    # ties go to the most recent occurrence with a full continuation
    draft, n = find_longest_context(np.array([7, 1, 7, 2, 7]), 1, 1)
    assert n == 1 and draft.tolist() == [2]
    assert find_longest_context(np.array([1, 2, 3]), 1, 4) is None
    assert find_longest_context(np.array([5, 3, 9, 4, 3]), 2, 2) is None


def test_longest_context_drafts_through_the_drafter():
    from leapdecode.drafters.base import DraftContext
    from leapdecode.sampling import SamplingParams

    drafter = PromptLookupDrafter(occurrence="longest", num_draft_tokens=2)
    drafter.begin([1], SamplingParams())
    tokens = [1, 2, 3, 4, 3, 6, 6, 8, 2, 3, 5, 1, 2, 3]
    tree = drafter.propose(DraftContext(tokens=tokens, prompt_length=11, max_tokens=8, params=SamplingParams(),
                                        generator=None))
    assert tree.tokens.tolist() == [[4, 3]] and tree.label == 3
