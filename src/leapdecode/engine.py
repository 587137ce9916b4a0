"""The decoding engine: prefill, then propose -> verify -> commit until a stop condition.

```
prompt ids ──► CausalLM prefill (all but the last prompt token)
loop: Drafter.propose(ctx) ─► DraftTree            (None = plain decoding step)
      CausalLM.score_tree(root, tree) ─► logits (1, N+1, V), one target forward pass
      verify(tree, logits, params, rng) ─► Verdict (accepted nodes + target token)
      CausalLM.keep_path(...)          ─► the cache holds exactly the committed text
      Drafter.update(feedback)
stop: EOS/end-of-turn token, max_new_tokens, stop string, context full
```
Invariant between steps: the target cache holds every committed token but the last, which is fed again
as the root of the next draft tree.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .draft_cut import DraftCut
from .drafters.base import DraftContext, DraftFeedback
from .errors import InvalidSettingError, LeapdecodeError, PromptTooLongError
from . import kv_compress
from .lm import CausalLM
from .methods import MethodBuild, get_method
from .sampling import SamplingParams, make_generator
from .stats import GenerationResult, GenerationStats
from .text_stream import TextAssembler
from .tree import DraftTree
from .verifiers import verify

Prompt = "str | Sequence[dict] | Sequence[int]"
_EMPTY = torch.zeros(1, 0, dtype=torch.long)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    params: SamplingParams = SamplingParams()
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InvalidSettingError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")


class Decoder:
    """A target model (and optional draft model) bound to one decoding method, reusable across calls.

    >>> dec = Decoder(load("smollm2-135m"), method="pld")
    >>> dec.generate("Rewrite ...", max_new_tokens=64).text
    """

    def __init__(self, target, method: str = "ar", draft=None, fit_width: bool = True, **options):
        self.spec = get_method(method)
        if self.spec.needs_draft_model and draft is None:
            raise InvalidSettingError(f"method {method!r} needs a draft model (draft=... / --draft-model)")
        if draft is not None:
            from .loading import check_draft_compatible

            check_draft_compatible(target, draft)
        self.target = target
        self.draft = draft
        self.method = method
        self.kv = kv_compress.take_settings(options)  # kv_cache=quant|gear, kv_bits=...: lossy KV compression
        self.lm = CausalLM(target.model, cache_factory=kv_compress.make_cache_factory(self.kv, target.model))
        self.build = MethodBuild(target=target, draft=draft, options=dict(options))
        self.drafter = self.spec.make_drafter(self.build)
        self.lm.keep_hidden = bool(getattr(self.drafter, "needs_target_hidden", False))
        # greedy drafts are cut to the size with the most expected tokens per second (draft_cut.py)
        self.cut = DraftCut() if fit_width and self.spec.target_patch is None else None

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
    def _commits(self, prompt_ids: list[int], settings: GenerationSettings, stats: GenerationStats) -> Iterator[list[int]]:
        """Run the engine; yield each step's committed tokens (already cut at EOS / max_new_tokens)."""
        context = self.target.context_length
        if len(prompt_ids) >= context:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens but {self.target.name!r} has a context of {context} tokens"
            )
        params, stop_ids = settings.params, self.target.stop_token_ids
        generator = make_generator(settings.seed)
        limit = min(settings.max_new_tokens, context - len(prompt_ids))
        started = time.perf_counter()
        with torch.inference_mode(), self.spec.patch_target(self.build):
            self.lm.reset()
            self.drafter.begin(prompt_ids, params)
            # The prompt is fed with the first verification pass (one target call fewer); methods that
            # patch the target (lossy ones) keep a separate prefill, which some of them decide on.
            lead = list(prompt_ids[:-1])
            if self.spec.target_patch is not None and lead:
                self.lm.forward(torch.tensor([lead], dtype=torch.long), logits_to_keep=1)
                lead = []
                stats.prefill_time = time.perf_counter() - started
            tokens = list(prompt_ids)
            produced = 0
            while produced < limit:
                step_started = time.perf_counter()
                measured = self.cut is not None and params.greedy and not lead  # not the prompt's pass
                budget = limit - produced - 1  # the target adds one token of its own
                tree = None
                if budget > 0:
                    ctx = DraftContext(tokens, len(prompt_ids), budget, params, generator, stop_ids)
                    tree = self.drafter.propose(ctx)
                if tree is None or tree.size == 0:
                    tree = DraftTree.chain(_EMPTY)
                elif tree.size > budget:
                    raise LeapdecodeError(f"drafter proposed {tree.size} tokens, over its budget of {budget}")
                else:
                    tree = tree.cut_after_stop(stop_ids)
                proposed = tree
                if measured and tree.size:
                    tree = tree.prefix(self.cut.choose(tree))
                if lead and not tree.layout.is_chain:  # a tree's mask would span the whole prompt: prefill
                    self.lm.forward(torch.tensor([lead], dtype=torch.long), logits_to_keep=1)
                    lead = []
                    stats.prefill_time = time.perf_counter() - started
                pass_started = time.perf_counter()
                start = self.lm.length + len(lead)  # cache position of the root
                logits = self.lm.score_tree(torch.tensor([lead + [tokens[-1]]], dtype=torch.long), tree)
                if lead:
                    lead = []
                    stats.prefill_time = time.perf_counter() - started  # prompt + first verification
                if logits.device.type != "cpu" and not params.greedy:
                    logits = logits.float().cpu()  # sampling draws from the CPU generator
                # (greedy verification takes the argmax where the logits are and moves only the ids)
                verdict = verify(tree, logits, params, generator)
                nodes, new = verdict.accepted_nodes[0], verdict.tokens[0]
                verified = time.perf_counter()
                self.lm.keep_path(start, nodes)
                self.drafter.update(DraftFeedback(proposed=tree.size, accepted=len(nodes), committed=new,
                                                  accepted_nodes=nodes, tree=tree, target_logits=logits,
                                                  target_hidden=self.lm.last_hidden))
                if measured:  # the pass and its verification, and the rest of the step (drafting)
                    seconds = verified - pass_started
                    rest = time.perf_counter() - step_started - seconds
                    self.cut.observe(proposed, new, tree.size + 1, seconds, rest)
                stats.target_forward_passes += 1
                stats.drafted_tokens += tree.size
                stats.accept_lengths.append(len(new))
                new = new[: limit - produced]
                hit = next((i for i, t in enumerate(new) if t in stop_ids), None)
                if hit is not None:
                    new = new[: hit + 1]
                    stats.stop_reason = "eos"
                tokens.extend(new)
                produced += len(new)
                stats.new_tokens = produced
                stats.wall_time = time.perf_counter() - started
                yield new
                if hit is not None:
                    return
            stats.stop_reason = "max_new_tokens" if limit == settings.max_new_tokens else "context"

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


class GenerationStream:
    """An iterator of text pieces over one generation; the full `GenerationResult` is in `.result`."""

    def __init__(self, decoder: Decoder, prompt_ids: list[int], settings: GenerationSettings):
        self.decoder, self.prompt_ids, self.settings = decoder, prompt_ids, settings
        self.emit = True  # False: no text pieces until the end (saves decoding on every step)
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        dec = self.decoder
        stats = GenerationStats(method=dec.method, prompt_tokens=len(self.prompt_ids))
        text = TextAssembler(dec.target.tokenizer, self.settings.stop)
        ids: list[int] = []
        commits = dec._commits(self.prompt_ids, self.settings, stats)
        for new in commits:
            taken = text.push(new)
            ids.extend(new[:taken])
            if text.stopped:
                stats.new_tokens = len(ids)
                stats.stop_reason = "stop_string"
                commits.close()
            piece = text.delta() if self.emit else ""
            if piece:
                yield piece
        tail = text.delta(final=True)
        if tail:
            yield tail
        stats.draft_forward_passes = getattr(dec.drafter, "forward_passes", 0)
        self.result = GenerationResult(text=text.text, token_ids=ids, prompt_ids=self.prompt_ids, stats=stats)


def _settings(max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
              seed: int | None = None, stop: str | Sequence[str] | None = None) -> GenerationSettings:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return GenerationSettings(max_new_tokens=max_new_tokens, params=SamplingParams(temperature, top_k, top_p),
                              seed=seed, stop=stops)


def generate(model, prompt, method: str = "pld", draft=None, *, chat: bool | None = None, stream: bool = False,
             method_options: dict | None = None, **settings):
    """One-shot generation. `model`/`draft` are `LoadedModel`s (or specs for `load`).

    Returns a `GenerationResult`, or a `GenerationStream` of text pieces when `stream=True`.
    """
    from .loading import LoadedModel, load

    model = model if isinstance(model, LoadedModel) else load(model)
    if draft is not None and not isinstance(draft, LoadedModel):
        draft = load(draft)
    decoder = Decoder(model, method=method, draft=draft, **(method_options or {}))
    if stream:
        return decoder.stream(prompt, chat=chat, **settings)
    return decoder.generate(prompt, chat=chat, **settings)
