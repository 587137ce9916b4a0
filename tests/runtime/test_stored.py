"""The converted model stored and loaded again: same modules, same logits, no float copy."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHITECTURES, tiny_config, tiny_tokenizer
from leapdecode.runtime import stored
from leapdecode.runtime.convert import Weights, apply_runtime


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("weights", [Weights.INT4, Weights.INT8])
def test_round_trip(arch, weights, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(arch, 64, 2)
    config.tie_word_embeddings = arch == "qwen2"  # a tied output layer too
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    info = apply_runtime(model, weights)
    folder = tmp_path / "m-int4"
    stored.save(model, tiny_tokenizer(64), info, folder)
    assert stored.usable(folder)
    again, tokenizer, info2 = stored.load(folder)
    assert info2 == info and tokenizer.convert_ids_to_tokens(5) == "w5"
    assert [type(m).__name__ for m in again.modules()] == [type(m).__name__ for m in model.modules()]
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not any(p.is_meta for p in again.parameters())


def test_another_kernel_is_not_used(tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64, 1)).eval()
    info = apply_runtime(model, Weights.INT4)
    stored.save(model, tiny_tokenizer(64), info, tmp_path / "m")
    record = json.loads((tmp_path / "m" / stored.MARKER).read_text())
    record["cpu_capability"] = "SOMETHING ELSE"
    (tmp_path / "m" / stored.MARKER).write_text(json.dumps(record))
    assert not stored.usable(tmp_path / "m")
    assert not stored.usable(tmp_path / "missing")
