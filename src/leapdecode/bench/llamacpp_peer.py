"""llama.cpp as a benchmark peer: `llamacpp-ar` and `llamacpp-pld` through llama-cpp-python.

Both read the same GGUF file as the target (a preset's assembled file or the `.gguf` the user gave), get
the same prompt token ids (so the same chat template), the same token budget and the same stop tokens,
decode greedily, and use torch's thread count (the bench's `--threads`). `llamacpp-ar` is llama.cpp's
plain decoding; `llamacpp-pld` adds llama-cpp-python's own prompt lookup (`LlamaPromptLookupDecoding`,
options `num_pred_tokens` (10) and `max_ngram_size` (2), as `llamacpp-pld@num_pred_tokens=2`).

llama.cpp computes with its own quantized kernels, so its greedy output is close to the float32 model's but
not identical: the bench reports its token agreement with `ar` instead of counting it as lossless.

llama-cpp-python is optional (`make peers` builds it); without it these methods fail with one line saying
so, before any model is loaded. Each call starts from an empty KV cache (no prompt reuse across calls, as
for every other method); the context is sized to the call and grown when a longer call comes.
"""
from __future__ import annotations

import time
from pathlib import Path

from leapdecode.errors import InvalidSettingError, LeapdecodeError

LLAMACPP_METHODS = ("llamacpp-ar", "llamacpp-pld")

PLD_OPTIONS = {"num_pred_tokens": 10, "max_ngram_size": 2}
"""`llamacpp-pld` options and their defaults (llama-cpp-python's own)."""

_MIN_CONTEXT = 2048

INSTALL_HINT = "install it with `make peers` (builds llama-cpp-python from source; several minutes)"


def is_llamacpp(method: str) -> bool:
    """True for `llamacpp-ar`, `llamacpp-pld` and their @option variants."""
    return method.split("@", 1)[0] in LLAMACPP_METHODS


def require_llamacpp(methods) -> None:
    """Raise a one-line LeapdecodeError when a llama.cpp method is asked for and llama_cpp is missing."""
    wanted = [m for m in methods if is_llamacpp(m)]
    if not wanted:
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise LeapdecodeError(f"{', '.join(wanted)} need{'s' if len(wanted) == 1 else ''} llama-cpp-python, "
                              f"which is not installed: {INSTALL_HINT}") from None


def check_options(base: str, options: dict) -> dict:
    """The options of one llama.cpp method with defaults filled in; unknown ones are refused."""
    allowed = PLD_OPTIONS if base == "llamacpp-pld" else {}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"takes {', '.join(allowed)}" if allowed else "takes no options"
        raise InvalidSettingError(f"{base} {takes}; got {', '.join(unknown)}")
    out = {**allowed, **options}
    for key, value in out.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidSettingError(f"{base}: {key} must be a positive integer, got {value!r}")
    return out


def gguf_file(target) -> Path:
    """The GGUF file the target was loaded from: a preset's verified file or the user's `.gguf`."""
    from leapdecode import loading, presets

    source = loading.resolve(target.name)
    if source.kind is loading.SourceKind.PRESET:
        return presets.gguf_path(source.preset, loading.cache_root())
    if source.kind is loading.SourceKind.GGUF:
        return Path(source.location)
    raise InvalidSettingError(f"the llama.cpp peers need a GGUF model (a preset or a .gguf file); "
                              f"{target.name!r} is a {source.kind.value}")


class LlamaCppRunner:
    """One llama.cpp method for `leapdecode bench` (the bench's `MethodRunner` protocol).

    Forward passes are llama.cpp's `eval` calls; a pass's accepted length is the number of tokens sampled
    after it (1 for plain decoding).
    """

    def __init__(self, name: str, target, options: dict | None = None, threads: int | None = None):
        from leapdecode.methods import split_variant

        require_llamacpp([name])
        self.name = name
        base, variant = split_variant(name)
        if base not in LLAMACPP_METHODS:
            raise InvalidSettingError(f"unknown llama.cpp peer {base!r}; peers: {', '.join(LLAMACPP_METHODS)}")
        self.base = base
        self.options = check_options(base, {**(options or {}), **variant})
        self.path = gguf_file(target)
        self.stop_ids = frozenset(int(t) for t in target.stop_token_ids)
        self.max_context = int(target.context_length)
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        self.threads = int(threads)
        self._llm = None
        self._n_ctx = 0

    def _model(self, needed: int):
        """The Llama object with a context of at least `needed` positions (rebuilt, untimed, to grow)."""
        if needed > self.max_context:
            raise LeapdecodeError(f"{self.name}: {needed} positions exceed the model's context of {self.max_context}")
        if self._llm is None or needed > self._n_ctx:
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            n_ctx = _MIN_CONTEXT
            while n_ctx < needed:
                n_ctx *= 2
            n_ctx = min(n_ctx, self.max_context)
            if self._llm is not None:
                self._llm.close()
                self._llm = None
            draft = None
            if self.base == "llamacpp-pld":
                draft = LlamaPromptLookupDecoding(max_ngram_size=self.options["max_ngram_size"],
                                                  num_pred_tokens=self.options["num_pred_tokens"])
            # logits_all: llama-cpp-python's speculative path reads every drafted position's logits
            self._llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=self.threads,
                              n_threads_batch=self.threads, draft_model=draft, logits_all=draft is not None,
                              verbose=False)
            self._n_ctx = n_ctx
        return self._llm

    def run(self, prompt_ids: list[int], max_new_tokens: int):
        from leapdecode.bench.summary import TurnOutput

        if not prompt_ids:
            raise InvalidSettingError(f"{self.name}: empty prompt")
        # + the draft tokens a last pass may append past the budget
        llm = self._model(len(prompt_ids) + max_new_tokens + self.options.get("num_pred_tokens", 0) + 1)
        per_pass: list[int] = []
        evaluate = llm.eval

        def counting_eval(tokens):
            per_pass.append(0)
            return evaluate(tokens)

        llm.eval = counting_eval  # instance attribute: only this object's calls are counted
        new: list[int] = []
        tokens = None
        try:
            llm.reset()  # empty KV cache: no prompt reuse from the previous call
            started = time.perf_counter()
            tokens = llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
            for token in tokens:
                token = int(token)
                new.append(token)
                per_pass[-1] += 1
                if token in self.stop_ids or len(new) >= max_new_tokens:
                    break
            wall = time.perf_counter() - started
        finally:
            if tokens is not None:
                tokens.close()
            del llm.eval
        accepted = [n for n in per_pass if n > 0]
        return TurnOutput(new, wall, len(per_pass), accepted if sum(accepted) == len(new) else [])

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
