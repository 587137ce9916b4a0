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
