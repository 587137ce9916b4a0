"""Superposed decoding on tiny random models: k distinct drafts, deterministic, one pass per step."""
from __future__ import annotations

import pytest

from conftest import tiny_loaded
from leapdecode import Decoder
from leapdecode.errors import InvalidSettingError
from leapdecode.lossy.superposed import NgramModel

PROMPT = [3, 7, 3, 7, 5, 9, 2]


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_k_distinct_drafts_deterministic(arch_name):
    model = tiny_loaded(arch_name, scale=2.0)
    dec = Decoder(model, method="superposed")
    first = dec.generate_several(PROMPT, 3, max_new_tokens=12, seed=1)
    again = Decoder(model, method="superposed").generate_several(PROMPT, 3, max_new_tokens=12, seed=1)
    assert len(first) == 3
    assert len({tuple(r.token_ids) for r in first}) == 3
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert all(len(r.token_ids) == 12 for r in first)
    assert first[0].stats.target_forward_passes == 11  # one pass per step for all three (after the prefill)


def test_one_draft_is_greedy_without_ngrams():
    model = tiny_loaded("llama", scale=2.0)
    greedy = Decoder(model, method="ar").generate(PROMPT, max_new_tokens=10)
    one = Decoder(model, method="superposed", ngram_weight=0).generate(PROMPT, max_new_tokens=10)
    assert one.token_ids == greedy.token_ids


def test_ngram_model_interpolates_seen_orders():
    ngram = NgramModel(3).add([1, 2, 3, 1, 2, 4])
    assert ngram.prob([1, 2], 3) == pytest.approx(0.5)
    assert ngram.prob([9], 3) == 0.0


def test_others_give_independent_samples_and_options_are_checked():
    model = tiny_loaded("llama")
    results = Decoder(model, method="ar").generate_several(PROMPT, 2, max_new_tokens=6, temperature=1.0, seed=3)
    assert len(results) == 2
    with pytest.raises(InvalidSettingError):
        Decoder(model, method="superposed", ngram_weight=1.5)
    with pytest.raises(InvalidSettingError):
        Decoder(model, method="ar").generate_several(PROMPT, 0)


def test_cli_num_return(capsys, tmp_path):
    from leapdecode.cli import main

    loaded = tiny_loaded("llama", scale=2.0)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    code = main(["generate", "w1 w2 w3 w1 w2", "--model", str(tmp_path), "--method", "superposed",
                 "--num-return", "3", "--max-new-tokens", "6"])
    out = capsys.readouterr()
    assert code == 0
    assert out.out.count("--- [") == 3 and "3 answers" in out.err
