"""SpecReason (step-level speculation, lossy) on tiny random models: its exact points (threshold 10: the big
model's greedy output; threshold 0: the small model's), the step records, two tokenizers, the final answer."""
from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import ARCHITECTURES, _model
from leapdecode import Decoder
from leapdecode.errors import InvalidSettingError
from leapdecode.loading import LoadedModel
from leapdecode.lossy.specreason import BOUNDARIES, ScorePrompt, step_end, step_score
from leapdecode.methods import LOSSY, get_method

PROMPT = [13, 17, 13, 17, 15, 19, 22]
WORDS = [str(d) for d in range(10)] + ["Score:", "."]  # ids 0-9: the digits, 10: "Score:", 11: "."


def word_tokenizer(vocab_size: int = 64, order=None) -> PreTrainedTokenizerFast:
    """Digits, "Score:" and "." plus words w12.. ; `order` permutes the ids (another tokenizer, same words)."""
    words = WORDS + [f"w{i}" for i in range(len(WORDS), vocab_size)]
    ids = list(range(vocab_size)) if order is None else order
    tok = Tokenizer(models.WordLevel(vocab={w: ids[i] for i, w in enumerate(words)}, unk_token="w12"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w12")


def pair(arch: str, draft_tokenizer=None, draft_stops=()):
    tok = word_tokenizer()
    big = LoadedModel(model=_model(arch, 64, 0, 2, 2.0), tokenizer=tok, name=f"big-{arch}")
    small = LoadedModel(model=_model(arch, 64, 1, 1, 2.0), tokenizer=draft_tokenizer or tok, name=f"small-{arch}",
                        stop_token_ids=frozenset(draft_stops))
    return big, small


@pytest.mark.parametrize("arch_name", ARCHITECTURES)
@pytest.mark.parametrize("reuse", [True, False])
def test_threshold_10_is_the_big_models_greedy_output(arch_name, reuse):
    big, small = pair(arch_name)
    greedy = Decoder(big, "ar").generate(PROMPT, max_new_tokens=24)
    out = Decoder(big, "specreason", draft=small, threshold=10, max_step_tokens=5, boundary="sentence",
                  reuse=reuse).generate(PROMPT, max_new_tokens=24)
    assert out.token_ids == greedy.token_ids
    st = out.stats
    assert st.steps_accepted == 0 and st.steps_rejected == len(st.step_scores) > 0
    assert st.small_tokens == 0 and st.method == "specreason"
    assert st.as_dict()["steps_rejected"] == st.steps_rejected


@pytest.mark.parametrize("arch_name", ARCHITECTURES)
def test_threshold_0_keeps_every_small_step(arch_name):
    big, small = pair(arch_name)
    small_greedy = Decoder(small, "ar").generate(PROMPT, max_new_tokens=23)
    out = Decoder(big, "specreason", draft=small, threshold=0, max_step_tokens=4).generate(PROMPT, max_new_tokens=23)
    assert out.token_ids == small_greedy.token_ids
    st = out.stats
    assert st.steps_rejected == 0 and st.steps_accepted == len(st.step_scores) == 6  # 5 steps of 4, one of 3
    assert st.small_tokens == 23 and st.target_forward_passes == 6 and st.accept_lengths == [4] * 5 + [3]
    assert all(0 <= s <= 9 for s in st.step_scores)


def test_scores_decide_and_every_step_is_counted():
    big, small = pair("llama")
    base = Decoder(big, "specreason", draft=small, threshold=0, max_step_tokens=3).generate(PROMPT, max_new_tokens=30)
    scores = base.stats.step_scores
    middle = sorted(scores)[len(scores) // 2]
    out = Decoder(big, "specreason", draft=small, threshold=middle, max_step_tokens=3).generate(
        PROMPT, max_new_tokens=30)
    st = out.stats
    assert len(out.token_ids) == 30
    assert st.steps_accepted + st.steps_rejected == len(st.step_scores)
    assert st.steps_accepted > 0 and st.steps_rejected > 0
    assert all((s >= middle) for s in st.step_scores[:1]) == (st.accept_lengths[0] == 3)


def test_final_answer_is_the_big_models():
    """When the small model ends (its end token), that step is dropped and the big model writes the rest."""
    big, small = pair("qwen2")
    plain = Decoder(small, "ar").generate(PROMPT, max_new_tokens=20).token_ids
    end = plain[9]
    first = plain.index(end)
    ended = LoadedModel(model=small.model, tokenizer=small.tokenizer, name="small-ends",
                        stop_token_ids=frozenset([end]))
    out = Decoder(big, "specreason", draft=ended, threshold=0, max_step_tokens=4).generate(PROMPT, max_new_tokens=20)
    kept = 4 * (first // 4)  # the steps before the one holding the end token
    assert out.token_ids[:kept] == plain[:kept]
    rest = Decoder(big, "ar").generate(PROMPT + plain[:kept], max_new_tokens=20 - kept).token_ids
    assert out.token_ids[kept:] == rest
    assert out.stats.steps_accepted == first // 4


def test_two_tokenizers_cross_as_text():
    order = list(range(64))
    order[12:] = reversed(order[12:])  # the draft's ids of the words differ from the target's
    draft_tok = word_tokenizer(order=order)
    big, small = pair("llama", draft_tokenizer=draft_tok)
    with pytest.raises(Exception):
        Decoder(big, "draft", draft=small)  # token-level methods refuse it
    small_prompt = draft_tok(big.tokenizer.decode(PROMPT), add_special_tokens=False)["input_ids"]
    small_text = Decoder(small, "ar").generate(small_prompt, max_new_tokens=12).text
    out = Decoder(big, "specreason", draft=small, threshold=0, max_step_tokens=4).generate(PROMPT, max_new_tokens=12)
    assert out.text == small_text
    greedy = Decoder(big, "ar").generate(PROMPT, max_new_tokens=12)
    never = Decoder(big, "specreason", draft=small, threshold=10, max_step_tokens=4).generate(PROMPT, max_new_tokens=12)
    assert never.token_ids == greedy.token_ids


def test_sampling_runs_and_is_seeded():
    big, small = pair("llama")
    dec = Decoder(big, "specreason", draft=small, threshold=5, max_step_tokens=4)
    a = dec.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=3)
    b = dec.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 16


def test_score_prompt_digits_and_score():
    tok = word_tokenizer()
    prompt = ScorePrompt.build(tok, "w20 w21 Score:")
    assert prompt.ids == (20, 21, 10) and prompt.digits == tuple(range(10))
    logits = torch.full((10,), -30.0)
    logits[7] = 0.0
    assert step_score(logits, "argmax") == 7.0
    assert step_score(logits, "expected") == pytest.approx(7.0, abs=1e-6)
    assert step_score(torch.zeros(10), "expected") == pytest.approx(4.5)
    with pytest.raises(InvalidSettingError):
        ScorePrompt.build(PreTrainedTokenizerFast(tokenizer_object=_no_digits()), "Score:")


def _no_digits():
    tok = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_step_end():
    tok = word_tokenizer()
    sentence = BOUNDARIES["sentence"]
    # "w13 . w14": the "." ends the step once the next word shows the white space after it
    assert step_end(tok, [13, 11], sentence) is None
    assert step_end(tok, [13, 11, 14], sentence) == 2
    assert step_end(tok, [11, 13, 11, 14], sentence) == 1  # a "." first: content already, it ends there
    assert step_end(tok, [13, 14], BOUNDARIES["newline"]) is None
    assert BOUNDARIES["newline"].search("a\nb") and not re.search(BOUNDARIES["sentence"], "3.5")


def test_registered_lossy_and_options_checked():
    spec = get_method("specreason")
    assert spec.promise == LOSSY and spec.needs_draft_model and not spec.same_tokenizer
    big, small = pair("llama")
    with pytest.raises(InvalidSettingError):
        Decoder(big, "specreason")  # needs a draft model
    for bad in ({"threshold": 11}, {"boundary": "para"}, {"max_step_tokens": 0}, {"score": "mean"},
                {"nope": 1}):
        with pytest.raises(InvalidSettingError):
            Decoder(big, "specreason", draft=small, **bad)


def test_reuse_verifies_the_rejected_step_as_a_token_draft():
    """A rejected step the big model agrees with is taken whole from the scoring pass (plus its own token)."""
    big, _ = pair("gemma3")
    greedy = Decoder(big, "ar").generate(PROMPT, max_new_tokens=20)
    out = Decoder(big, "specreason", draft=big, threshold=10, max_step_tokens=4).generate(PROMPT, max_new_tokens=20)
    assert out.token_ids == greedy.token_ids
    assert out.stats.steps_rejected == 4 and out.stats.accept_lengths == [5, 5, 5, 5]


def test_runs_through_the_benchmark_runner(tmp_path):
    from leapdecode.bench.questions import Question
    from leapdecode.bench.runner import BenchSettings, run_benchmark

    big, small = pair("llama")
    questions = [Question(1, "math", ["w13 w17 w13 w17 w15"], reference="w13"), Question(2, "chat", ["w20 w21"])]
    result = run_benchmark(big, small, questions, ["ar", "specreason@threshold=5@max_step_tokens=3"],
                           BenchSettings(max_new_tokens=8, warmup_tokens=2), tmp_path / "out", progress=False,
                           plots=False)
    rows = [r for r in result.records if r.method.startswith("specreason")]
    assert [r.question_id for r in rows] == [1, 2] and all(r.new_tokens == 8 for r in rows)
    assert result.summary["methods"]["specreason@threshold=5@max_step_tokens=3"]["token_agreement"] is not None
