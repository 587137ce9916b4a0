"""Model loading: presets, `.gguf` files, local folders (safetensors) and hub ids from the local cache.

`load(spec)` turns any of these into a `LoadedModel`: the model in eval mode with SDPA attention and no
gradients, its tokenizer (with a chat template where one is known), the token ids that end a turn and the
context length. Weights are never downloaded: hub ids are looked up in the local Hugging Face cache only.

Dequantizing a GGUF takes 15-60 s, so the first load of a `.gguf` file or a preset saves the dequantized
model and tokenizer as safetensors under the leapdecode cache folder (`$LEAPDECODE_CACHE`, default
`~/.cache/leapdecode`), written to a temp folder and renamed into place; later loads read that copy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Iterator

import torch

from leapdecode import presets
from leapdecode.errors import InvalidSettingError, LeapdecodeError, ModelNotFoundError
from leapdecode.runtime import compiled, stored
from leapdecode.runtime.convert import RuntimeInfo, Weights, apply_runtime, parse_weights


@dataclass
class LoadedModel:
    """A causal LM ready for decoding, with the tokenizer and facts the engine needs."""

    model: torch.nn.Module = field(repr=False)  # transformers PreTrainedModel in eval mode, float32 on CPU by default
    tokenizer: object = field(repr=False)  # transformers PreTrainedTokenizerBase
    name: str  # the spec the user gave (preset name, path or hub id)
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)  # EOS + chat-template end tokens
    context_length: int = 2048  # max positions the model accepts
    source: str = ""  # where the weights were read from: a folder, a .gguf file, or a cache folder
    from_cache: bool = False  # True when a GGUF/preset was read from leapdecode's dequantized cache
    runtime: RuntimeInfo = field(default_factory=RuntimeInfo)  # weights mode and whether passes are exact

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().out_features)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @functools.cached_property
    def tokenizer_fingerprint(self) -> str:
        """sha256 of the token -> id mapping (computed once; used to compare draft and target)."""
        return vocab_fingerprint(self.tokenizer)


# ----- where a spec points ---------------------------------------------------------------------------

class SourceKind(Enum):
    PRESET = "preset"
    GGUF = "gguf"
    FOLDER = "folder"
    HUB = "hub"


@dataclass(frozen=True)
class ModelSource:
    """What a spec resolved to. `location` is a path for files and folders, the id for hub models."""

    kind: SourceKind
    location: str
    preset: presets.Preset | None = None


def cache_root() -> Path:
    """The leapdecode cache folder: `$LEAPDECODE_CACHE`, else `~/.cache/leapdecode`."""
    env = os.environ.get("LEAPDECODE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "leapdecode"


_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(_PATH_PREFIXES) or spec.lower().endswith(".gguf") or spec.count("/") > 1


def resolve(spec: str) -> ModelSource:
    """Decide what `spec` names: a preset, a .gguf file, a local folder, or (else) a hub id."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelNotFoundError(f"model spec must be a non-empty string, got {spec!r}")
    preset = presets.get_preset(spec)
    if preset is not None:
        return ModelSource(SourceKind.PRESET, spec, preset)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"'{spec}' is a file but not a .gguf file; pass a .gguf file or a folder with config.json"
            )
        return ModelSource(SourceKind.GGUF, str(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(SourceKind.FOLDER, str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(SourceKind.GGUF, str(ggufs[0]))
        found = f"{len(ggufs)} .gguf files" if ggufs else "no .gguf file"
        raise ModelNotFoundError(f"folder '{spec}' has no config.json and {found}; cannot load a model from it")
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"model '{spec}' not found: no such file or folder")
    return ModelSource(SourceKind.HUB, spec)


def _not_found_anywhere(spec: str) -> ModelNotFoundError:
    names = list(presets.PRESETS)
    close = difflib.get_close_matches(spec, names, n=1)
    hint = f" (did you mean preset '{close[0]}'?)" if close else ""
    return ModelNotFoundError(
        f"model '{spec}' not found{hint}: tried presets ({', '.join(names)}), a local file or folder, and the "
        f"local Hugging Face cache; leapdecode never downloads weights: pass a preset, a .gguf file or a "
        f"local model folder, or download '{spec}' into the Hugging Face cache yourself first"
    )


# ----- progress ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _load_status(spec: str, what: str, progress: bool) -> Iterator[None]:
    """One status line on stderr around a load (plus transformers' own bars); fully quiet when not
    `progress`. Restores transformers' progress-bar and logging settings afterwards."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    start = time.perf_counter()
    if progress:
        print(f"leapdecode: loading {spec} ({what})...", file=sys.stderr, flush=True)
    else:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as quiet:
            if not progress:
                warnings.simplefilter("ignore")
                # some transformers GGUF paths draw plain tqdm bars that ignore the switch above
                quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
    if progress:
        print(f"leapdecode: loaded {spec} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _note(progress: bool, message: str) -> None:
    if progress:
        print(f"leapdecode: {message}", file=sys.stderr, flush=True)


# ----- transformers loaders ------------------------------------------------------------------------------

def _from_pretrained(location: str | Path, dtype: torch.dtype, gguf_file: str | None = None
                     ) -> tuple[torch.nn.Module, object]:
    """Tokenizer and model from a folder, a cached hub id or a GGUF file, never touching the network.

    A GGUF is dequantized whole (plain dense weights), whatever optional kernels are installed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_extra: dict = {}
    model_extra: dict = {}
    if gguf_file is not None:
        from transformers.utils.quantization_config import GgufConfig

        tok_extra = {"gguf_file": gguf_file}
        model_extra = {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True, **tok_extra)
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=dtype, attn_implementation="sdpa", local_files_only=True, **model_extra
    )
    return model, tokenizer


def _load_folder_or_hub(source: ModelSource, spec: str, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    if source.kind is SourceKind.HUB:
        from transformers import AutoConfig

        try:  # cheap presence check in the local hub cache before the (slow) model load
            AutoConfig.from_pretrained(spec, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise _not_found_anywhere(spec) from exc
    try:
        return _from_pretrained(source.location, dtype)
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotFoundError(f"could not load model '{spec}' from {source.location}: {first_line}") from exc


def _require_accelerate() -> None:
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise LeapdecodeError("loading a .gguf file needs the 'accelerate' package: pip install accelerate")


_CACHE_FORMAT = "v1"
_CACHE_MARKER = "leapdecode-cache.json"
_STALE_TMP_SECONDS = 3600


def _models_dir() -> Path:
    return cache_root() / f"models-{_CACHE_FORMAT}"


def _cache_dir_for(source: ModelSource) -> Path:
    """Presets are keyed by their pinned sha256; other .gguf files by name, size and mtime."""
    if source.preset is not None:
        return _models_dir() / f"{source.preset.name}-{source.preset.sha256[:16]}"
    gguf = Path(source.location)
    st = gguf.stat()
    ident = hashlib.sha256(f"{gguf.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem)[:80]
    return _models_dir() / f"{stem}-{ident}"


def cached_model_dir(spec: str) -> Path:
    """The folder where the dequantized copy of a preset or .gguf `spec` is (or will be) cached."""
    source = resolve(spec)
    if source.kind not in (SourceKind.PRESET, SourceKind.GGUF):
        raise ModelNotFoundError(f"'{spec}' is not a preset or .gguf file; only those are cached")
    return _cache_dir_for(source)


def _remove_stale_temp_dirs(models_dir: Path) -> None:
    now = time.time()
    for tmp in models_dir.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)


def _save_cache(model: torch.nn.Module, tokenizer, target: Path, meta: dict) -> None:
    """Save model + tokenizer into `target` atomically: a temp folder beside it, then one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(meta, indent=1))  # last: marks the copy complete
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache folder is an ordinary one
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _CACHE_MARKER).is_file():  # not another process finishing first: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_gguf_quantizer(model: torch.nn.Module) -> None:
    """Make a fully dequantized GGUF model a plain model (transformers refuses to save it otherwise)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def _load_gguf(
    source: ModelSource, spec: str, dtype: torch.dtype, progress: bool, keep_copy: bool = True
) -> tuple[torch.nn.Module, object, Path, bool]:
    """Model and tokenizer of a preset or .gguf file, from leapdecode's cache when it has them.

    Returns (model, tokenizer, where it was read from, whether that was the cache)."""
    cached = _cache_dir_for(source)
    if (cached / _CACHE_MARKER).is_file():  # a preset's copy is used even without re-checking its packages
        try:
            model, tokenizer = _from_pretrained(cached, dtype)
            return model, tokenizer, cached, True
        except Exception as exc:  # damaged copy (truncated file, bad header...): drop it and rebuild it
            _note(progress, f"cached copy at {cached} is unreadable ({type(exc).__name__}); rebuilding it")
            shutil.rmtree(cached, ignore_errors=True)

    if source.preset is not None:
        _note(progress, f"checking the {source.preset.name} package files (first load only)")
        gguf = presets.gguf_path(source.preset, cache_root())  # not installed / damaged: one-line error
    else:
        gguf = Path(source.location)
    _require_accelerate()
    _note(progress, f"dequantizing {gguf.name} (first load only; 15-60 s)")
    # Always dequantize to float32 so the cached copy does not depend on the dtype asked for this time.
    model, tokenizer = _from_pretrained(gguf.parent, torch.float32, gguf_file=gguf.name)
    _drop_gguf_quantizer(model)
    ensure_chat_template(tokenizer)
    st = gguf.stat()
    meta = {
        "spec": spec,
        "gguf": str(gguf.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": source.preset.sha256 if source.preset is not None else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if keep_copy:  # (a quantized runtime stores its converted model instead: runtime/stored.py)
        try:
            _note(progress, f"saving dequantized copy to {cached}")
            _save_cache(model, tokenizer, cached, meta)
        except OSError as exc:  # a read-only or full disk must not stop the load itself
            _note(True, f"could not write the cache at {cached} ({exc}); the next load will dequantize again")
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, tokenizer, gguf, False


# ----- tokenizer facts ---------------------------------------------------------------------------------

# Tokens that end a chat turn in common templates; used as stop tokens when present in the vocabulary.
END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML: SmolLM2, Qwen
    "<|endoftext|>",  # GPT-2 style, Qwen, SmolLM2
    "<end_of_turn>",  # Gemma
    "<|eot_id|>",  # Llama 3
    "<|end_of_text|>",  # Llama 3 base
    "<|end|>",  # Phi-3
)

# Text-only Gemma chat template (the shape Gemma 3's tokenizer ships with); used when a GGUF carries the
# turn tokens but no template (the Gemma 3 270M GGUF does not carry one).
_GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# (tokens that must all be in the vocabulary, template), tried in order
_FALLBACK_TEMPLATES = (
    (("<start_of_turn>", "<end_of_turn>"), _GEMMA_CHAT_TEMPLATE),
    (("<|im_start|>", "<|im_end|>"), _CHATML_TEMPLATE),
)


def ensure_chat_template(tokenizer) -> None:
    """Give `tokenizer` a chat template when it has none but its vocabulary has a known turn format."""
    if getattr(tokenizer, "chat_template", None):
        return
    vocab = tokenizer.get_vocab()
    for needed, template in _FALLBACK_TEMPLATES:
        if all(tok in vocab for tok in needed):
            tokenizer.chat_template = template
            return


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def stop_token_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    """The tokenizer's EOS, the model's generation-config EOS ids, and end-of-turn tokens it knows."""
    ids: set[int] = set(_as_ids(getattr(tokenizer, "eos_token_id", None)))
    gen_config = getattr(model, "generation_config", None)
    ids.update(_as_ids(getattr(gen_config, "eos_token_id", None)))
    ids.update(_as_ids(getattr(model.config, "eos_token_id", None)))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tok] for tok in END_OF_TURN_TOKENS if tok in vocab)
    return frozenset(i for i in ids if i >= 0)


def context_length(model: torch.nn.Module, default: int = 2048) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else default


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's token -> id mapping (added tokens included)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


# ----- public entry points ------------------------------------------------------------------------------

def resolve_device(name: str | None = "auto") -> str:
    """'auto' (or None) -> 'cuda' when a GPU is visible, else 'cpu'; any other name is checked by torch."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InvalidSettingError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidSettingError(f"device {name!r} asked for, but torch sees no CUDA GPU here")
    return str(device)


def _gguf_behind(source: ModelSource, read_from: Path, from_cache: bool) -> Path | None:
    """The GGUF file a preset or .gguf load came from (its blocks feed the quantized layers), if still there."""
    if source.kind is SourceKind.GGUF:
        return Path(source.location)
    if source.kind is not SourceKind.PRESET:
        return None
    if not from_cache:
        return read_from
    try:
        recorded = Path(json.loads((read_from / _CACHE_MARKER).read_text())["gguf"])
    except (OSError, ValueError, KeyError):
        return None
    return recorded if recorded.is_file() else None


def _load_gguf_runtime(source: ModelSource, spec: str, dtype: torch.dtype, mode: Weights, progress: bool
                       ) -> tuple[torch.nn.Module, object, RuntimeInfo, str, bool]:
    """A preset or .gguf file in the `mode` runtime: from its stored conversion when there is one, else
    converted from the dequantized model (then stored, and no float32 copy kept for a quantized mode)."""
    stored_dir = stored.folder_for(_cache_dir_for(source), mode) if mode is not Weights.FP32 else None
    if stored_dir is not None and stored.usable(stored_dir):
        try:
            model, tokenizer, runtime = stored.load(stored_dir)
            return model, tokenizer, runtime, str(stored_dir), True
        except Exception as exc:  # damaged or stale copy: convert again
            _note(progress, f"stored {mode.value} model at {stored_dir} is unusable ({type(exc).__name__}); "
                            "converting again")
            shutil.rmtree(stored_dir, ignore_errors=True)
    model, tokenizer, read_from, from_cache = _load_gguf(source, spec, dtype, progress,
                                                         keep_copy=stored_dir is None)
    ensure_chat_template(tokenizer)
    model.eval()
    model.requires_grad_(False)
    runtime = apply_runtime(model, mode, _gguf_behind(source, read_from, from_cache))
    if stored_dir is not None:
        try:
            _note(progress, f"storing the {mode.value} model at {stored_dir} (first load only)")
            stored.save(model, tokenizer, runtime, stored_dir)
        except OSError as exc:
            _note(True, f"could not store the {mode.value} model at {stored_dir} ({exc})")
    return model, tokenizer, runtime, str(read_from), from_cache


def load(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         progress: bool = True, weights: str | None = "auto", compile: bool = False,
         draft: bool = False) -> LoadedModel:
    """Load a preset name, a `.gguf` file, a local model folder, or a hub id from the local HF cache.

    `weights` picks the runtime (runtime/convert.py): `int4` (the CPU default, "auto"; a GGUF's own 4-bit blocks
    kept as they are), `int4-all` (every layer in 4-bit groups; the "auto" choice for `draft=True`, a model loaded
    to draft for another), `int8`, `bf16`, or `fp32` (the float32 reference). The int modes compute row-invariant
    passes, which makes lossless methods bitwise identical to plain decoding.
    `compile`: run the passes of single-sequence decoding as compiled graphs (runtime/compiled.py; int4, int4-all,
    int8 only; compiled and checked row-invariant here, minutes the first time, then read from inductor's disk cache).

    Raises ModelNotFoundError (one line, saying what was tried) when nothing matches, and for a preset
    whose packages are missing (with the pip command that installs them).
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    source = resolve(spec)
    try:
        mode = parse_weights(weights, str(device), draft=draft)
    except ValueError as exc:
        raise InvalidSettingError(str(exc)) from None
    if compile and not mode.exact:
        raise InvalidSettingError(_NOT_COMPILABLE.format(mode.value))
    what = {
        SourceKind.PRESET: "preset",
        SourceKind.GGUF: "GGUF file",
        SourceKind.FOLDER: "local folder",
        SourceKind.HUB: "local Hugging Face cache",
    }[source.kind]
    from_cache = False
    with _load_status(spec, what, progress):
        if source.kind in (SourceKind.PRESET, SourceKind.GGUF):
            model, tokenizer, runtime, location, from_cache = _load_gguf_runtime(source, spec, dtype, mode,
                                                                                 progress)
        else:
            model, tokenizer = _load_folder_or_hub(source, spec, dtype)
            location = source.location
            ensure_chat_template(tokenizer)
            model.eval()
            model.requires_grad_(False)
            runtime = apply_runtime(model, mode, None)
        model.to(device)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=spec,
        stop_token_ids=stop_token_ids(model, tokenizer),
        context_length=context_length(model),
        source=location,
        from_cache=from_cache,
        runtime=runtime,
    )
    if compile:
        loaded = with_compiled_passes(loaded, progress)
    _note(progress, loaded.runtime.describe())
    return loaded


_NOT_COMPILABLE = "--compile runs the exact runtime's passes; it needs --weights int4, int4-all or int8, not {}"


def with_compiled_passes(loaded: LoadedModel, progress: bool = True) -> LoadedModel:
    """`loaded` with compiled passes (runtime/compiled.py): every `CausalLM` over its model uses them. Compiles
    the decoding graphs now (minutes the first time, seconds once inductor's disk cache has them), so the
    first generation's timing is not the compiler's."""
    if not loaded.runtime.exact:
        raise InvalidSettingError(_NOT_COMPILABLE.format(loaded.runtime.weights.value))
    passes = compiled.enable(loaded.model)  # CompilationError: an InvalidSettingError saying why not
    _note(progress, f"compiling the passes of {loaded.name} (first time: minutes; then read from disk)")
    start = time.perf_counter()
    if not passes.warm_up():
        compiled.disable(loaded.model)
        raise InvalidSettingError(f"the compiled passes of {loaded.name} are not row-invariant on this machine (a "
                                  "token's logits differ between a one-token pass and a chain), so lossless "
                                  "methods would not be exact: run without --compile")
    _note(progress, f"compiled passes ready and checked row-invariant in {time.perf_counter() - start:.0f} s")
    return dataclasses.replace(loaded, runtime=dataclasses.replace(loaded.runtime, compiled=True))


def check_draft_compatible(target: LoadedModel, draft: LoadedModel) -> None:
    """Raise IncompatibleDraftError unless `draft` uses the same tokenizer as `target`.

    Same tokenizer means: the same number of tokens and the same token -> id mapping; the LM heads may
    differ only in padding rows past the tokenizer's vocabulary.
    """
    from leapdecode.errors import IncompatibleDraftError

    t_tok, d_tok = target.tokenizer, draft.tokenizer
    n_target, n_draft = len(t_tok), len(d_tok)
    problem = None
    if t_tok is not d_tok:
        if n_target != n_draft:
            problem = f"their tokenizers have {n_target} and {n_draft} tokens"
        elif target.tokenizer_fingerprint != draft.tokenizer_fingerprint:
            problem = f"their tokenizers map tokens to ids differently (both have {n_target} tokens)"
    if problem is None:
        head_t, head_d = target.vocab_size, draft.vocab_size
        if head_t != head_d and min(head_t, head_d) < n_target:
            problem = (f"their output layers have {head_t} and {head_d} rows for a {n_target}-token "
                       f"vocabulary")
    if problem is not None:
        raise IncompatibleDraftError(
            f"draft model '{draft.name}' cannot draft for target '{target.name}': {problem}; drafting with a "
            f"different tokenizer is not supported yet: pick a draft from the target's model family "
            f"(e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b)"
        )
