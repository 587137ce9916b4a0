"""What each engine loads: config keys, tensor names and shapes per export format, each with the engine file
it comes from, and `check_export`, which holds an exported folder against it.

Shapes are written with the letters of the drafter's facts, read back from the exported config:
H hidden size, V vocabulary size, K heads (Medusa), L layers (Medusa blocks per head, EAGLE decoder layers),
A attention heads, G key/value heads, D head size, I MLP width. `{i}` runs over the heads, `{l}` over the
layers, `{j}` over the blocks of a head; a tensor with `layers="from1"` exists for layers 1.. only (EAGLE's
first layer has no input norm).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

VLLM_MEDUSA_MODEL = "vllm/model_executor/models/medusa.py"
VLLM_MEDUSA_CONFIG = "vllm/transformers_utils/configs/medusa.py"
VLLM_MEDUSA_PROPOSER = "vllm/v1/spec_decode/medusa.py"
VLLM_EAGLE_MODEL = "vllm/model_executor/models/llama_eagle.py"
VLLM_EAGLE_CONFIG = "vllm/transformers_utils/configs/eagle.py"
SGLANG_EAGLE_MODEL = "python/sglang/srt/models/llama_eagle.py"


@dataclass(frozen=True)
class ConfigKey:
    key: str
    source: str  # engine file that reads it, and how
    value: object = None  # the exact value the engine needs, or None when it is the drafter's own fact


@dataclass(frozen=True)
class TensorSpec:
    name: str  # with {i}, {j}, {l} placeholders
    shape: tuple[str, ...]  # letters of the facts (see the module docstring), "2H" = 2 * H
    source: str
    layers: str = "all"  # all | from1 (EAGLE: layers 1.. only)
    when: str = ""  # a config key that must be true for the tensor to exist ("" = always)


@dataclass(frozen=True)
class FormatSpec:
    name: str
    engine: str
    config: tuple[ConfigKey, ...]
    tensors: tuple[TensorSpec, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


_EAGLE_LAYER = (
    TensorSpec("layers.{l}.input_layernorm.weight", ("H",),
               "LlamaDecoderLayer of the engine; layer 0 replaces it by an identity (EAGLE skips the input norm)",
               layers="from1"),
    TensorSpec("layers.{l}.self_attn.q_proj.weight", ("A*D", "H"), "the engine's LlamaDecoderLayer (q into qkv_proj)"),
    TensorSpec("layers.{l}.self_attn.k_proj.weight", ("G*D", "H"), "the engine's LlamaDecoderLayer (k into qkv_proj)"),
    TensorSpec("layers.{l}.self_attn.v_proj.weight", ("G*D", "H"), "the engine's LlamaDecoderLayer (v into qkv_proj)"),
    TensorSpec("layers.{l}.self_attn.o_proj.weight", ("H", "A*D"), "the engine's LlamaDecoderLayer"),
    TensorSpec("layers.{l}.mlp.gate_proj.weight", ("I", "H"), "the engine's LlamaMLP (gate into gate_up_proj)"),
    TensorSpec("layers.{l}.mlp.up_proj.weight", ("I", "H"), "the engine's LlamaMLP (up into gate_up_proj)"),
    TensorSpec("layers.{l}.mlp.down_proj.weight", ("H", "I"), "the engine's LlamaMLP"),
    TensorSpec("layers.{l}.post_attention_layernorm.weight", ("H",), "the engine's LlamaDecoderLayer"),
)

_EAGLE_CONFIG = (
    ConfigKey("model_type", "a Llama config: the engine builds its LlamaDecoderLayer from it", "llama"),
    ConfigKey("hidden_size", "H"),
    ConfigKey("intermediate_size", "I"),
    ConfigKey("num_attention_heads", "A"),
    ConfigKey("num_key_value_heads", "G"),
    ConfigKey("head_dim", "D"),
    ConfigKey("num_hidden_layers", "L: the decoder layers of the drafter"),
    ConfigKey("rms_norm_eps", "the layers' RMSNorm"),
    ConfigKey("rope_theta", "the layers' rotary embedding"),
    ConfigKey("hidden_act", "LlamaMLP: SiLU-gated", "silu"),
    ConfigKey("vocab_size", "V: the target's vocabulary (embed_tokens)"),
    ConfigKey("max_position_embeddings", "the rotary embedding's cache"),
    ConfigKey("tie_word_embeddings", "false: the LM head is the target's, not embed_tokens", False),
)

def _cite(source: str, keys: tuple[ConfigKey, ...]) -> tuple[ConfigKey, ...]:
    return tuple(ConfigKey(k.key, f"{source}: {k.source}", k.value) for k in keys)


FORMATS: dict[str, FormatSpec] = {
    "vllm-medusa": FormatSpec(
        "vllm-medusa", "vLLM",
        config=(
            ConfigKey("model_type", f"{VLLM_MEDUSA_CONFIG}: MedusaConfig.model_type", "medusa"),
            ConfigKey("architectures", f"{VLLM_MEDUSA_CONFIG}: the default architectures", ["MedusaModel"]),
            ConfigKey("hidden_size", f"{VLLM_MEDUSA_CONFIG}; {VLLM_MEDUSA_MODEL}: ResidualBlock width"),
            ConfigKey("vocab_size", f"{VLLM_MEDUSA_CONFIG}; {VLLM_MEDUSA_MODEL}: lm_heads rows, the target's vocabulary"),
            ConfigKey("num_heads", f"{VLLM_MEDUSA_CONFIG}; {VLLM_MEDUSA_MODEL}: one block and LM head per head; "
                      f"{VLLM_MEDUSA_PROPOSER}: one drafted token per head"),
            ConfigKey("num_hidden_layers", f"{VLLM_MEDUSA_CONFIG}; {VLLM_MEDUSA_MODEL}: linear layers per block"),
            ConfigKey("medusa_fc_bias", f"{VLLM_MEDUSA_MODEL}: ResidualBlock's linear layers carry a bias"),
            ConfigKey("truncated_vocab_size", f"{VLLM_MEDUSA_CONFIG}: = vocab_size (no token_map)"),
        ),
        tensors=(
            TensorSpec("blocks.{i}.layers.{j}.weight", ("H", "H"), f"{VLLM_MEDUSA_MODEL}: ResidualBlock.layers"),
            TensorSpec("blocks.{i}.layers.{j}.bias", ("H",), f"{VLLM_MEDUSA_MODEL}: ResidualBlock.layers",
                       when="medusa_fc_bias"),
            TensorSpec("lm_heads.{i}.weight", ("V", "H"), f"{VLLM_MEDUSA_MODEL}: Medusa.lm_heads (ParallelLMHead)"),
        ),
        notes=(f"{VLLM_MEDUSA_MODEL} skips names it does not know without a word, leaving its parameters unset",
               f"{VLLM_MEDUSA_PROPOSER}: a chain of each head's top token, no tree"),
    ),
    "vllm-eagle": FormatSpec(
        "vllm-eagle", "vLLM",
        config=(ConfigKey("architectures", f"{VLLM_EAGLE_CONFIG}: LlamaForCausalLM becomes EagleLlamaForCausalLM "
                          "(method eagle)", ["LlamaForCausalLM"]),) + _cite(VLLM_EAGLE_MODEL, _EAGLE_CONFIG),
        tensors=(
            TensorSpec("fc.weight", ("H", "2H"), f"{VLLM_EAGLE_MODEL}: LlamaModel.fc over cat(embedding, hidden), "
                       "bias=False"),
            TensorSpec("embed_tokens.weight", ("V", "H"), f"{VLLM_EAGLE_MODEL}: LlamaModel.embed_tokens (the "
                       "target's; shared with the target when pipeline parallelism is off)"),
        ) + tuple(TensorSpec(t.name, t.shape, f"{VLLM_EAGLE_MODEL}: {t.source}", t.layers) for t in _EAGLE_LAYER),
        notes=(f"{VLLM_EAGLE_MODEL}: fc has no bias and a fc.bias in the file is skipped without a word",
               f"{VLLM_EAGLE_MODEL}: the output (hidden + residual, no final norm) feeds the target's LM head"),
    ),
    "sglang-eagle": FormatSpec(
        "sglang-eagle", "SGLang",
        config=(ConfigKey("architectures", f"{SGLANG_EAGLE_MODEL}: EntryClass LlamaForCausalLMEagle",
                          ["LlamaForCausalLMEagle"]),) + _cite(SGLANG_EAGLE_MODEL, _EAGLE_CONFIG),
        tensors=(
            TensorSpec("fc.weight", ("H", "2H"), f"{SGLANG_EAGLE_MODEL}: LlamaModel.fc over cat(embedding, hidden)"),
            TensorSpec("fc.bias", ("H",), f"{SGLANG_EAGLE_MODEL}: LlamaModel.fc has a bias (left unset if absent)"),
            TensorSpec("embed_tokens.weight", ("V", "H"), f"{SGLANG_EAGLE_MODEL}: LlamaModel.embed_tokens (the "
                       "engine may share the target's)"),
        ) + tuple(TensorSpec(t.name, t.shape, f"{SGLANG_EAGLE_MODEL}: {t.source}", t.layers) for t in _EAGLE_LAYER),
        notes=(f"{SGLANG_EAGLE_MODEL}: lm_head names are skipped; the target's LM head is used",),
    ),
}


def facts_from_config(fmt: str, config: dict) -> dict[str, int]:
    """The letters of the shapes, from an exported config."""
    if fmt == "vllm-medusa":
        return {"H": config["hidden_size"], "V": config["vocab_size"], "K": config["num_heads"],
                "L": config["num_hidden_layers"]}
    return {"H": config["hidden_size"], "V": config["vocab_size"], "L": config["num_hidden_layers"],
            "A": config["num_attention_heads"], "G": config["num_key_value_heads"], "D": config["head_dim"],
            "I": config["intermediate_size"]}


def _size(term: str, facts: dict[str, int]) -> int:
    value = 1
    for part in term.split("*"):
        if part[0].isdigit():
            value *= int(part[:-1]) * facts[part[-1]]
        else:
            value *= facts[part]
    return value


def expected_tensors(fmt: str, config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name the engine loads for this config, with its shape."""
    spec, facts = FORMATS[fmt], facts_from_config(fmt, config)
    out: dict[str, tuple[int, ...]] = {}
    for t in spec.tensors:
        if t.when and not config.get(t.when):
            continue
        shape = tuple(_size(s, facts) for s in t.shape)
        if "{i}" in t.name:  # Medusa: head i, block j
            for i in range(facts["K"]):
                if "{j}" in t.name:
                    for j in range(facts["L"]):
                        out[t.name.format(i=i, j=j)] = shape
                else:
                    out[t.name.format(i=i)] = shape
        elif "{l}" in t.name:
            for layer in range(1 if t.layers == "from1" else 0, facts["L"]):
                out[t.name.format(l=layer)] = shape
        else:
            out[t.name] = shape
    return out


def check_config(fmt: str, config: dict) -> list[str]:
    problems = []
    for key in FORMATS[fmt].config:
        if key.key not in config:
            problems.append(f"config key {key.key!r} missing ({key.source})")
        elif key.value is not None and config[key.key] != key.value:
            problems.append(f"config key {key.key!r} is {config[key.key]!r}, the engine needs {key.value!r} "
                            f"({key.source})")
    return problems


def check_tensors(fmt: str, config: dict, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Problems of a set of tensor names and shapes against the manifest: missing, unknown, misshapen."""
    want = expected_tensors(fmt, config)
    problems = [f"tensor {n!r} missing" for n in sorted(set(want) - set(shapes))]
    problems += [f"tensor {n!r} is not one the engine loads" for n in sorted(set(shapes) - set(want))]
    problems += [f"tensor {n!r} has shape {list(shapes[n])}, the engine needs {list(want[n])}"
                 for n in sorted(set(want) & set(shapes)) if tuple(shapes[n]) != want[n]]
    return problems


def check_export(folder: str | Path, fmt: str) -> list[str]:
    """Everything wrong with an exported folder for `fmt` (an empty list when it matches the manifest)."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    problems = check_config(fmt, config)
    if problems:
        return problems
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    return check_tensors(fmt, config, shapes)
