"""`leapdecode perplexity`: NLL through a (compressed) KV cache, fed block by block."""
from __future__ import annotations

import math

import pytest
import torch

from leapdecode.bench.perplexity import (Generated, PerplexityResult, agreement, builtin_text, format_table,
                                         perplexity, settings_list)
from leapdecode.cli import build_parser
from leapdecode.errors import InvalidSettingError
from leapdecode.kv_compress import KVSettings
from conftest import tiny_loaded


def _ids(n: int = 70) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 64, (n,), generator=g).tolist()


def test_plain_cache_perplexity_equals_one_full_pass():
    target = tiny_loaded("llama", scale=3.0)
    ids = _ids()
    result = perplexity(target, ids, None, chunk=16)
    with torch.no_grad():
        logits = target.model(torch.tensor([ids])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert result.nll == pytest.approx(nll, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-4)
    assert result.kv_bytes >= 2 * 2 * 2 * 16 * len(ids) * 4  # layers, k+v, heads, head dim, float32 (+ spare room)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_compressed_cache_changes_perplexity_little_at_8_bits_and_chunking_does_not_matter(arch):
    target = tiny_loaded(arch, scale=3.0)
    ids = _ids()
    plain = perplexity(target, ids, None, chunk=16)
    s8 = KVSettings("gear", 8, rank=1, outliers=0.01, window=16, block=8)
    eight = perplexity(target, ids, s8, chunk=16)
    assert eight.kv_bytes < plain.kv_bytes
    assert abs(eight.nll - plain.nll) < 0.02
    # every query sees the view of its position, whatever the feeding: chunks of 5 give the same NLL
    assert perplexity(target, ids, s8, chunk=5).nll == pytest.approx(eight.nll, abs=1e-5)
    s2 = KVSettings("quant", 2, window=16, block=8)
    assert perplexity(target, ids, s2, chunk=16).nll != pytest.approx(plain.nll, abs=1e-6)


def test_agreement_counts_equal_tokens():
    target = tiny_loaded("qwen2", scale=6.0)
    ids = _ids(40)
    plain = agreement(target, ids, None, None, 12)
    assert plain.agreement is None and len(plain.tokens) == 12
    ref = plain.tokens
    got = agreement(target, ids, KVSettings("gear", 8, window=16, block=8), ref, 12)
    assert 0.0 <= got.agreement <= 1.0 and 0 <= got.same_prefix <= 12
    assert 0.0 <= got.rouge_l <= 1.0 and got.gap is None  # no gaps given
    if got.tokens == ref:
        assert got.agreement == 1.0 and got.same_prefix == 12 and got.rouge_l == 1.0
    # the gap where two greedy paths part: the reference's top-1 minus top-2 logit at the first difference
    from leapdecode.bench.perplexity import top_two_gaps

    gaps = top_two_gaps(target, ids, ref)
    assert len(gaps) == 12 and all(g >= 0 for g in gaps)
    other = ref[:5] + [(ref[5] + 1) % 64] + ref[6:]
    assert agreement(target, ids, None, other, 12, gaps).gap == gaps[5]
    # the bytes each cache held after generating, against a bf16 cache of the text and the generated tokens
    assert 0 < got.kv_bytes < plain.kv_bytes and got.bf16_bytes == plain.bf16_bytes > 0


def test_settings_list_and_table():
    base = KVSettings()
    runs = settings_list("gear,none,quant", "4,2", base)
    assert runs[0] is None and [(s.kind, s.bits) for s in runs[1:]] == [("gear", 4), ("quant", 4), ("gear", 2),
                                                                         ("quant", 2)]
    with pytest.raises(InvalidSettingError):
        settings_list("zip", "4", base)
    with pytest.raises(InvalidSettingError):
        settings_list("gear", "3", base)
    table = format_table([PerplexityResult("none", 10, 1.0, 100, 50), PerplexityResult("quant-4", 10, 1.01, 30, 50)])
    assert "+1.01%" in table and "60.0%" in table
    # agreement over several prompts: means, identical answers, bytes held after the first prompt's decoding
    runs = [Generated([1, 2], 1.0, 2, 1.0, None, 30, 100), Generated([1, 3], 0.5, 1, 0.4, 0.125, 31, 100)]
    result = PerplexityResult("gear-4", 10, 1.0, 30, 50, decoded=runs)
    assert result.agreement == 0.75 and result.same_prefix == 1.5 and result.identical == 1
    assert result.rouge_l == pytest.approx(0.7) and result.decoded_share == 0.3 and result.gap == 0.125
    line = format_table([result]).splitlines()[-1]
    assert "0.750" in line and "0.700" in line and "1/2" in line and "0.125" in line and "30.0%" in line


def test_summarize_task_wraps_the_slice_in_a_chat_request():
    from leapdecode.bench.perplexity import SUMMARIZE, agreement_prompt

    target = tiny_loaded("qwen2", scale=6.0)
    ids = target.tokenizer("The cache keeps recent tokens exact.", add_special_tokens=False)["input_ids"]
    assert agreement_prompt(target, ids, "continue") == ids
    assert not target.tokenizer.chat_template  # the tiny models' tokenizer has none: refused with a clear error
    with pytest.raises(InvalidSettingError, match="chat template"):
        agreement_prompt(target, ids, "summarize")
    target.tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}[assistant] "
    try:
        got = agreement_prompt(target, ids, "summarize")
        messages = [{"role": "user", "content": SUMMARIZE + target.tokenizer.decode(ids)}]
        rendered = target.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    finally:
        target.tokenizer.chat_template = None
    assert rendered.startswith("[user] " + SUMMARIZE) and rendered.endswith("[assistant] ")
    assert got == target.tokenizer(rendered, add_special_tokens=False)["input_ids"] and len(got) > len(ids)


def test_builtin_text_is_long_and_deterministic():
    name, text = builtin_text()
    assert "pydoc_data" in name and len(text) > 100_000
    assert builtin_text()[1] == text


def test_cli_has_perplexity_and_kv_flags():
    parser = build_parser()
    args = parser.parse_args(["perplexity", "--kv-cache", "none,gear", "--kv-bits", "4,2", "--max-tokens", "100"])
    assert args.kv_cache == "none,gear" and args.max_tokens == 100
    args = parser.parse_args(["generate", "hi", "--kv-cache", "gear", "--kv-bits", "2"])
    from leapdecode.kv_compress import options_from_args

    assert options_from_args(args)["kv_cache"] == "gear" and options_from_args(args)["kv_bits"] == 2
    args = parser.parse_args(["perplexity", "--agreement", "32", "--agreement-prompts", "4", "--kv-sink", "0",
                              "--agreement-task", "summarize"])
    assert args.agreement_prompts == 4 and args.kv_sink == 0 and args.agreement_task == "summarize"
    args = parser.parse_args(["bench", "--out", "x", "--kv-cache", "quant"])
    assert args.kv_cache == "quant"
