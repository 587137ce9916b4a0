"""The single-request API: `Decoder` (a target, an optional draft model and one method, reusable across calls),
`generate` and streaming. Each request is one `step.Sequence` run through `step.decode_step` until it stops.

```
prompt ──► ids (chat template or raw) ──► Sequence (drafter begins with the prompt)
loop: step.decode_step([sequence], SequenceScorer)   propose -> cut -> score -> verify -> commit -> stop
      (the first pass also feeds the prompt, so prefill costs no extra call; on the exact runtime the
      prompt goes in alone first: SequenceScorer)
stop: EOS/end-of-turn token, max_new_tokens, stop string, context full
```
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import torch

from .draft_cut import DraftCut, DraftHistory
from .errors import InvalidSettingError, PromptTooLongError
from . import kv_compress
from .lm import CausalLM
from .methods import MethodBuild, get_method
from .stats import GenerationResult
from .step import GenerationSettings, Sequence as StepSequence, decode_step, settings as _settings
from .tree import DraftTree

Prompt = "str | Sequence[dict] | Sequence[int]"


class SequenceScorer:
    """The `step.Scorer` of one sequence: a `CausalLM` and its cache. The prompt (all but its last token) is
    fed with the first verification pass (one target call fewer), or alone first (`prefill`) when that pass
    is a branching tree, whose mask would span the whole prompt, or when the runtime is exact
    (`separate_prompt`: the prompt alone takes the fused kernel, and every method feeds it the same way; a
    compressed KV cache keeps such a prompt exact, so every method feeds it alone there too)."""

    def __init__(self, lm: CausalLM, lead: list[int], separate_prompt: bool = False):
        self.lm, self.lead, self.separate_prompt = lm, list(lead), separate_prompt
        self.prefilled_at: float | None = None  # perf_counter once the prompt is in the cache
        self.start = 0  # cache position of the last pass's root

    @property
    def prompt_pending(self) -> bool:
        return bool(self.lead)

    def prefill(self) -> None:
        if self.lead:
            self.lm.forward(torch.tensor([self.lead], dtype=torch.long), logits_to_keep=1, prompt=True)
            self.lead = []
            self.prefilled_at = time.perf_counter()

    def score(self, roots: list[int], trees: list[DraftTree], hidden: list[int | None]):
        (root,), (tree,) = roots, trees
        if self.lead and (self.separate_prompt or not tree.layout.is_chain):
            self.prefill()
        self.start = self.lm.length + len(self.lead)
        logits = self.lm.score_tree(torch.tensor([self.lead + [root]], dtype=torch.long), tree)
        if self.lead:
            self.lead = []
            self.prefilled_at = time.perf_counter()  # prompt + first verification
        return logits, self.lm.last_hidden

    def commit(self, accepted: list[list[int]]) -> None:
        self.lm.keep_path(self.start, accepted[0])


class Decoder:
    """A target model (and optional draft model) bound to one decoding method, reusable across calls.

    >>> dec = Decoder(load("smollm2-135m"), method="pld")
    >>> dec.generate("Rewrite ...", max_new_tokens=64).text
    """

    def __init__(self, target, method: str = "ar", draft=None, fit_width: bool = True, **options):
        self.spec = get_method(method)
        if self.spec.needs_draft_model and draft is None:
            raise InvalidSettingError(f"method {method!r} needs a draft model (draft=... / --draft-model)")
        if draft is not None and self.spec.same_tokenizer:
            from .loading import check_draft_compatible

            check_draft_compatible(target, draft)
        self.target = target
        self.draft = draft
        self.method = method
        self.kv = kv_compress.take_settings(options)  # kv_cache=quant|gear, kv_bits=...: lossy KV compression
        self.lm = CausalLM(target.model, cache_factory=kv_compress.make_cache_factory(self.kv, target.model))
        self.separate_prompt = target.runtime.exact or self.kv is not None  # SequenceScorer's
        self.build = MethodBuild(target=target, draft=draft, options=dict(options))
        self.drafter = self.spec.make_drafter(self.build)
        self.lm.keep_hidden = self.drafter.needs_target_hidden
        self.lm.hidden_layer = self.drafter.target_hidden_layer
        # greedy drafts are cut to the size with the most expected tokens per second (draft_cut.py); what it
        # learns of this decoder's drafts carries over from call to call
        self.cut = DraftCut() if fit_width and self.spec.target_patch is None else None
        self.history = DraftHistory() if self.cut is not None else None

    # ----- prompts -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt, chat: bool | None = None) -> list[int]:
        """Token ids for a string (raw, or with the chat template when `chat`), a list of chat messages,
        or a list of token ids."""
        tok = self.target.tokenizer
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidSettingError("the prompt is empty")
            if chat:
                return self.encode_prompt([{"role": "user", "content": prompt}])
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            if not self.target.has_chat_template:
                raise InvalidSettingError(f"model {self.target.name!r} has no chat template; pass a plain string")
            ids = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise InvalidSettingError("the prompt must be a non-empty string, list of chat messages or list of ids")
        ids = [int(i) for i in ids]
        if not ids:
            raise InvalidSettingError("the prompt is empty after tokenization")
        return ids

    # ----- the loop ----------------------------------------------------------------------------------
    def _commits(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[StepSequence]:
        """Run the engine on one sequence; yield it after each step (its `new` tokens already cut at the stops)."""
        context = self.target.context_length
        if len(prompt_ids) >= context:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens but {self.target.name!r} has a context of {context} tokens"
            )
        started = time.perf_counter()
        with torch.inference_mode(), self.spec.patch_target(self.build):
            self.lm.reset()
            row = StepSequence.begin(prompt_ids, settings, self.drafter, method=self.method,
                                     tokenizer=self.target.tokenizer, stop_ids=self.target.stop_token_ids,
                                     context_length=context, history=self.history, started=started,
                                     logits_rule=self.spec.make_rule(self.build))
            scorer = SequenceScorer(self.lm, prompt_ids[:-1], separate_prompt=self.separate_prompt)
            if self.spec.target_patch is not None:  # methods that patch the target (lossy ones) keep a
                scorer.prefill()  # separate prefill, which some of them decide on
            while not row.finished:
                decode_step([row], scorer, self.cut)
                if scorer.prefilled_at is not None:
                    row.stats.prefill_time = scorer.prefilled_at - started
                yield row

    def stream(self, prompt, *, chat: bool | None = None, **settings) -> "GenerationStream":
        """Iterate to receive text as it is committed; `.result` holds the result afterwards."""
        return GenerationStream(self, self.encode_prompt(prompt, chat), _settings(**settings))

    def generate(self, prompt, *, chat: bool | None = None, on_text: Callable[[str], None] | None = None,
                 **settings) -> GenerationResult:
        """Generate to the end; `on_text` (optional) receives each piece of text as it is committed."""
        stream = self.stream(prompt, chat=chat, **settings)
        stream.emit = on_text is not None  # without a listener, text is decoded once at the end
        for piece in stream:
            if on_text is not None:
                on_text(piece)
        return stream.result

    def generate_several(self, prompt, n: int, *, chat: bool | None = None, **settings) -> list[GenerationResult]:
        """`n` results for one prompt: the method's own loop when it makes several at once (superposed
        decoding: one pass per step for all of them), else `n` independent generations (seed, seed+1, ...
        when a seed is given)."""
        if not isinstance(n, int) or n < 1:
            raise InvalidSettingError(f"the number of results must be a positive integer, got {n!r}")
        ids = self.encode_prompt(prompt, chat)
        if self.spec.run is not None:
            return self._run(ids, _settings(**settings), n)
        seed = settings.pop("seed", None)
        return [self.generate(ids, seed=None if seed is None else seed + i, **settings) for i in range(n)]

    def _run(self, prompt_ids: list[int], settings: GenerationSettings, n: int) -> list[GenerationResult]:
        """A method with its own loop (`MethodSpec.run`)."""
        if len(prompt_ids) >= self.target.context_length:
            raise PromptTooLongError(f"the prompt has {len(prompt_ids)} tokens but {self.target.name!r} has a "
                                     f"context of {self.target.context_length} tokens")
        with torch.inference_mode():
            self.lm.reset()
            return self.spec.run(self.build, self.lm, prompt_ids, settings, n)


class GenerationStream:
    """An iterator of text pieces over one generation; the full `GenerationResult` is in `.result`."""

    def __init__(self, decoder: Decoder, prompt_ids: list[int], settings: GenerationSettings):
        self.decoder, self.prompt_ids, self.settings = decoder, prompt_ids, settings
        self.emit = True  # False: no text pieces until the end (saves decoding on every step)
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        if self.decoder.spec.run is not None:  # a method with its own loop: the whole text at the end
            self.result = self.decoder._run(self.prompt_ids, self.settings, 1)[0]
            if self.result.text:
                yield self.result.text
            return
        row = None
        for row in self.decoder._commits(self.prompt_ids, self.settings):
            piece = row.text.delta() if self.emit else ""
            if piece:
                yield piece
        tail = row.text.delta(final=True)
        if tail:
            yield tail
        self.result = row.result()


def generate(model, prompt, method: str = "pld", draft=None, *, chat: bool | None = None, stream: bool = False,
             method_options: dict | None = None, **settings):
    """One-shot generation. `model`/`draft` are `LoadedModel`s (or specs for `load`).

    Returns a `GenerationResult`, or a `GenerationStream` of text pieces when `stream=True`.
    """
    from .loading import LoadedModel, load

    model = model if isinstance(model, LoadedModel) else load(model)
    if draft is not None and not isinstance(draft, LoadedModel):
        draft = load(draft, draft=True)
    decoder = Decoder(model, method=method, draft=draft, **(method_options or {}))
    if stream:
        return decoder.stream(prompt, chat=chat, **settings)
    return decoder.generate(prompt, chat=chat, **settings)
