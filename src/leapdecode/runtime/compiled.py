"""Compiled passes: the exact runtime's forward pass as a `torch.compile` graph (inductor's CPU backend).

On a CPU a one-token pass of a small model is mostly framework time (module calls, norms, rotary embeddings,
dtype conversions, each a separate op); compiling the whole pass into one graph fuses the small ops and drops
the Python per module. What stops a plain `torch.compile(model)` is the KV cache: its length changes every pass
and is held as Python ints, so each length would be a new graph. Here the graph never sees the cache:

```
CausalLM ──► CompiledPasses(input_ids, position_ids, cache, 4-D mask)
               │  sets the pass context (cache, mask) and calls the compiled graph with cache=None
               ▼
             compiled graph: embedding, every decoder layer, LM head (shapes depend only on the pass width)
               │  each attention call is one opaque op, `leapdecode::cached_attention(q, k, v, layer)`:
               ▼
             runs eagerly: appends k, v to the context's cache, then `attention.exact_attention` over the
             cache (the same row-invariant routine as the eager runtime), returns the rows' outputs
```
Two graphs serve every pass of a sequence batch: width 1 (decoding steps) and any width >= 2 (chains, trees,
with the tree's ancestor mask taken from the context), both returning the hidden states too (one graph whether
or not a drafter reads them: a graph without those outputs could fuse, and round, differently), each compiled
on first use (minutes on two cores, mostly g++ on the C++ wrapper; then read from inductor's on-disk cache in
later processes). Inductor's fused
kernels compute each row the same way whatever the number of rows, so a token's logits are bitwise identical
alone, in a chain and in a tree (tests/runtime/test_compiled.py); they are not bitwise equal to the eager
runtime's, so within a process every pass of a model goes through the graph or none does. A prompt fed alone
into an empty cache (`PROMPT_PASS`) stays eager, as every sequence's prompt is fed that way.

Scope: single-sequence decoding (the engine, draft models, the bench). The batch engine (server,
`bench-serve`) runs eager, and models with sliding-window layers (Gemma 3) are refused, since the graph's
attention sees no mask of its own.
"""
from __future__ import annotations

import itertools
import threading
import types
import weakref
from dataclasses import dataclass

import torch

from ..errors import InvalidSettingError
from . import attention

@dataclass(frozen=True)
class PassOutput:
    """What a compiled pass returns, named like transformers' outputs for `CausalLM`."""

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    last_hidden_state: torch.Tensor | None = None


class CompilationError(InvalidSettingError):
    """The model cannot take compiled passes (said in one line)."""


def check_supported(model: torch.nn.Module) -> None:
    cfg = model.config.get_text_config()
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        raise CompilationError(f"compiled passes do not support sliding-window layers ({cfg.model_type}); "
                               "run without --compile")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise CompilationError("compiled passes do not support attention logit soft-capping; run without --compile")


def _logits_pass(model, input_ids, position_ids):
    # Always with the hidden states: a graph without them would be another graph, whose fused kernels may round
    # differently, and a method whose drafter reads them (hydra) must see the logits `ar` sees.
    out = model(input_ids=input_ids, position_ids=position_ids, cache=None, use_cache=False,
                output_hidden_states=True)
    return out.logits, tuple(out.hidden_states)


def _decoder_pass(model, input_ids, position_ids):
    return model.get_decoder()(input_ids=input_ids, position_ids=position_ids, cache=None,
                               use_cache=False).last_hidden_state


_COUNT = itertools.count()


def _compiled_copy(fn):
    """`torch.compile` of a copy of `fn` with a code object of its own. Dynamo keeps graphs per code object and,
    with the module checks dropped (below), would hand one model's graphs to another (a draft model's to its
    target); one copy per model keeps them apart."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_COUNT)}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    # The graphs do not re-check the model's modules on every call (that check cost about 2 ms a pass): the
    # model must not change while it has compiled passes, which is why module swaps (`layer_skip.gated`)
    # refuse a compiled model. `cpp_wrapper`: the graph's kernels are called from C++ rather than from
    # generated Python (about 2 ms less a pass on SmolLM2-135M; compiling takes longer).
    # `fullgraph`: one graph per pass or an error; a graph break would compile the decoder layers as frames of their
    # own, and those (without the module checks) would be shared by layers whose weights differ in shape
    return torch.compile(own, fullgraph=True,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                  "cpp_wrapper": True})


class CompiledPasses:
    """Called like the model by `CausalLM` (the same keywords); the decoder alone through `get_decoder()`."""

    def __init__(self, model: torch.nn.Module):
        check_supported(model)
        self.model = model
        # one eager pass asking for hidden states first: transformers installs the hooks that collect them on
        # the first such call, which must not happen while a graph is being traced
        with torch.inference_mode():
            device = next(model.parameters()).device
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False,
                  output_hidden_states=True)
        self._logits = _compiled_copy(_logits_pass)
        self._decoder = _compiled_copy(_decoder_pass)

    def _run(self, graph, input_ids, cache, position_ids, attention_mask, *extra):
        if isinstance(attention_mask, dict):
            raise CompilationError("compiled passes take one attention mask, not one per layer type")
        batch, width = input_ids.shape
        if position_ids is None:
            past = cache.get_seq_length()
            position_ids = torch.arange(past, past + width, device=input_ids.device).unsqueeze(0).expand(batch, -1)
        # fresh contiguous inputs: a slice's strides or storage offset would be a reason to compile anew
        input_ids = input_ids.clone(memory_format=torch.contiguous_format)
        position_ids = position_ids.clone(memory_format=torch.contiguous_format)
        for dim, size in enumerate((batch, width)):  # sizes other than 1 share one graph
            if size > 1:
                torch._dynamo.mark_dynamic(input_ids, dim)
                torch._dynamo.mark_dynamic(position_ids, dim)
        attention.PASS_CONTEXT.begin_pass(cache, attention_mask, batch, width, cache.get_seq_length())
        try:
            return graph(self.model, input_ids, position_ids, *extra)
        finally:
            attention.PASS_CONTEXT.end_pass()

    def __call__(self, *, input_ids, cache, use_cache=True, logits_to_keep: int = 0, position_ids=None,
                 attention_mask=None, output_hidden_states: bool = False, **kwargs) -> PassOutput:
        if kwargs.get(attention.PROMPT_PASS):  # a prompt into an empty cache: the eager fused kernel
            out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep,
                             output_hidden_states=output_hidden_states, **kwargs)
            return PassOutput(out.logits, out.hidden_states if output_hidden_states else None)
        logits, hidden = self._run(self._logits, input_ids, cache, position_ids, attention_mask)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return PassOutput(logits, hidden if output_hidden_states else None)

    @torch.inference_mode()
    def warm_up(self, probe_width: int = 8) -> bool:
        """Compile (or read back from inductor's disk cache) the two graphs decoding uses, width 1 and wider, and
        check on this model that they agree: `probe_width` tokens fed one by one and as one chain must give
        bitwise equal logits and cache entries. Returns whether they do (before the RMS norms and MLPs became
        opaque C++ ops, runtime/fused.py, inductor's kernels for Qwen2.5-Coder-1.5B's two graphs rounded some rows
        differently; with them its graphs pass, as SmolLM2-135M's always did)."""
        from .cache import GrowingCache

        vocab = self.model.config.get_text_config().vocab_size
        device = next(self.model.parameters()).device
        ids = torch.randint(0, vocab, (1, 24 + probe_width), generator=torch.Generator().manual_seed(0)).to(device)

        def after_prompt() -> GrowingCache:
            cache = GrowingCache()
            self(input_ids=ids[:, :24], cache=cache, logits_to_keep=1, **{attention.PROMPT_PASS: True})
            return cache

        alone, together = after_prompt(), after_prompt()
        steps = [self(input_ids=ids[:, i:i + 1], cache=alone).logits[0, -1] for i in range(24, ids.shape[1])]
        chain = self(input_ids=ids[:, 24:], cache=together).logits[0]
        same = all(torch.equal(chain[i], row) for i, row in enumerate(steps))
        return same and all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                            for a, b in zip(alone.layers, together.layers))

    def get_decoder(self):
        return self._decode

    # The decoder-only graph serves draft models' draft-vocabulary passes (`CausalLM.forward_hidden`), whose
    # numbers only shape proposals; a target never mixes it with the logits graph.
    def _decode(self, *, input_ids, cache, use_cache=True, position_ids=None, attention_mask=None) -> PassOutput:
        return PassOutput(last_hidden_state=self._run(self._decoder, input_ids, cache, position_ids,
                                                      attention_mask))


_PASSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def disable(model: torch.nn.Module) -> None:
    """Back to eager passes for `model` (its `CausalLM`s created from then on)."""
    _PASSES.pop(model, None)


def enable(model: torch.nn.Module) -> CompiledPasses:
    """Give `model` compiled passes (every `CausalLM` over it uses them from then on)."""
    if model not in _PASSES:
        # every compiled model adds its own graphs under the same code (widths 1 and >= 2, with and without
        # hidden states, the decoder alone): room for a target, a draft model and their variants
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _PASSES[model] = CompiledPasses(model)
    return _PASSES[model]


def passes_for(model: torch.nn.Module) -> CompiledPasses | None:
    """The model's compiled passes, or None when it runs eager."""
    return _PASSES.get(model)
