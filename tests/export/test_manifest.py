"""`export/manifest.py`: every config key and tensor of every format cites the engine file it comes from, and
the expected names and shapes follow the drafter's facts."""
from __future__ import annotations

import pytest

from leapdecode.export import FORMATS as WRITERS
from leapdecode.export.manifest import (FORMATS, SGLANG_EAGLE_MODEL, VLLM_EAGLE_MODEL, VLLM_MEDUSA_MODEL,
                                        check_config, expected_tensors)

ENGINE_FILES = {"vllm-medusa": "vllm/", "vllm-eagle": "vllm/", "sglang-eagle": "python/sglang/"}


def test_every_format_has_a_writer_and_a_manifest():
    assert set(WRITERS) == set(FORMATS) == {"vllm-medusa", "vllm-eagle", "sglang-eagle"}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_entry_cites_an_engine_file(fmt):
    spec = FORMATS[fmt]
    tensors = [t.source for t in spec.tensors]
    assert all(ENGINE_FILES[fmt] in s and ".py" in s for s in tensors)
    assert all(ENGINE_FILES[fmt] in k.source and ".py" in k.source for k in spec.config)


def test_medusa_names_and_shapes():
    config = {"hidden_size": 8, "vocab_size": 20, "num_heads": 2, "num_hidden_layers": 2, "medusa_fc_bias": True}
    want = expected_tensors("vllm-medusa", config)
    assert want["blocks.1.layers.1.weight"] == (8, 8) and want["blocks.0.layers.0.bias"] == (8,)
    assert want["lm_heads.1.weight"] == (20, 8) and len(want) == 2 * 2 * 2 + 2
    assert "blocks.0.layers.0.bias" not in expected_tensors("vllm-medusa", dict(config, medusa_fc_bias=False))
    assert VLLM_MEDUSA_MODEL in FORMATS["vllm-medusa"].tensors[0].source


@pytest.mark.parametrize("fmt,source", [("vllm-eagle", VLLM_EAGLE_MODEL), ("sglang-eagle", SGLANG_EAGLE_MODEL)])
def test_eagle_names_and_shapes(fmt, source):
    config = {"hidden_size": 8, "vocab_size": 20, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 4, "intermediate_size": 12}
    want = expected_tensors(fmt, config)
    assert want["fc.weight"] == (8, 16)
    assert ("fc.bias" in want) == (fmt == "sglang-eagle")
    assert want["layers.0.self_attn.k_proj.weight"] == (4, 8) and want["layers.1.mlp.down_proj.weight"] == (8, 12)
    assert "layers.0.input_layernorm.weight" not in want and want["layers.1.input_layernorm.weight"] == (8,)
    assert all(source in t.source for t in FORMATS[fmt].tensors)


def test_config_check_names_the_key_and_the_value():
    assert check_config("vllm-medusa", {"model_type": "medusa"})[0].startswith("config key 'architectures' missing")
    problems = check_config("sglang-eagle", {k.key: 1 if k.value is None else k.value for k in FORMATS["sglang-eagle"].config}
                            | {"architectures": ["LlamaForCausalLM"]})
    assert problems == ["config key 'architectures' is ['LlamaForCausalLM'], the engine needs "
                        f"['LlamaForCausalLMEagle'] ({SGLANG_EAGLE_MODEL}: EntryClass LlamaForCausalLMEagle)"]
