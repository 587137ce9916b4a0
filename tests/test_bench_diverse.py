"""`bench-diverse`'s metrics and runs on tiny models."""
from __future__ import annotations

import pytest

from conftest import tiny_loaded
from leapdecode.bench.diverse import distinct_n, overlap, perplexity, rep_n, run_open_ended, run_several


def test_text_metrics():
    assert rep_n([1, 2, 1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 5)
    assert rep_n([1], 2) == 0.0
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert overlap([[1, 2, 3], [1, 2, 3]]) == 1.0 and overlap([[1, 2], [3, 4]]) == 0.0


def test_runs_report_every_method():
    target = tiny_loaded("llama", scale=4.0)
    prompts = [[3, 7, 3, 7, 5], [9, 2, 9, 2, 4]]
    several = run_several(target, prompts, 3, 8, 0.9, 0)
    assert set(several) == {"superposed", "nucleus", "greedy"}
    assert several["greedy"]["overlap"] == 1.0 and several["superposed"]["overlap"] < 1.0
    assert all(row["perplexity"] > 1 for row in several.values())
    open_ended = run_open_ended(target, prompts, 40)
    assert set(open_ended) == {"greedy", "momentum", "contrastive"}
    assert open_ended["momentum"]["rep_4"] < open_ended["greedy"]["rep_4"]
    assert perplexity(target, [1, 2], [3, 4]) > 1
