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
with the tree's ancestor mask taken from the context), each compiled on first use (about a minute for
SmolLM2-135M on two cores, then read from inductor's on-disk cache in later processes). Inductor's fused
kernels compute each row the same way whatever the number of rows, so a token's logits are bitwise identical
alone, in a chain and in a tree (tests/runtime/test_compiled.py); they are not bitwise equal to the eager
runtime's, so within a process every pass of a model goes through the graph or none does. A prompt fed alone
into an empty cache (`PROMPT_PASS`) stays eager, as every sequence's prompt is fed that way.

Scope: single-sequence decoding (the engine, draft models, the bench). The batch engine (server,
`bench-serve`) runs eager, and models with sliding-window layers (Gemma 3) are refused, since the graph's
attention sees no mask of its own.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from . import attention

_ATTENTION_OP = "leapdecode::cached_attention"


class _PassContext(threading.local):
    """The cache and tree mask of the compiled pass in flight (read by the attention op)."""

    cache = None
    mask: torch.Tensor | None = None


_CONTEXT = _PassContext()


@torch.library.custom_op(_ATTENTION_OP, mutates_args=())
def cached_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
                     scaling: float) -> torch.Tensor:
    """query (B, H, q, D), the pass's new key/value rows (B, Hkv, q, D): append them to the context's cache
    at decoder layer `layer`, then attend over the whole cache; returns (B, q, H, D)."""
    keys, values = _CONTEXT.cache.update(key, value, layer)
    out, _ = attention.exact_attention(None, query, keys, values, _CONTEXT.mask, scaling=scaling)
    return out.contiguous()


@cached_attention.register_fake
def _cached_attention_shape(query, key, value, layer, scaling):
    batch, heads, q, _ = query.shape
    return query.new_empty(batch, q, heads, value.shape[-1])


def attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           scaling: float | None) -> torch.Tensor:
    """What `attention.exact_attention` does while a graph is being compiled: one opaque attention op."""
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    return cached_attention(query, key, value, int(module.layer_idx), scale)


@dataclass(frozen=True)
class PassOutput:
    """What a compiled pass returns, named like transformers' outputs for `CausalLM`."""

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    last_hidden_state: torch.Tensor | None = None


class CompilationError(ValueError):
    """The model cannot take compiled passes (said in one line)."""


def check_supported(model: torch.nn.Module) -> None:
    cfg = model.config.get_text_config()
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        raise CompilationError(f"compiled passes do not support sliding-window layers ({cfg.model_type}); "
                               "run without --compile")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise CompilationError("compiled passes do not support attention logit soft-capping; run without --compile")


class CompiledPasses:
    """Called like the model by `CausalLM` (the same keywords); the decoder alone through `get_decoder()`."""

    def __init__(self, model: torch.nn.Module):
        check_supported(model)
        self.model = model
        self._logits = torch.compile(self._logits_pass)
        self._decoder = torch.compile(self._decoder_pass)

    def _logits_pass(self, input_ids, position_ids, hidden: bool):
        out = self.model(input_ids=input_ids, position_ids=position_ids, cache=None, use_cache=False,
                         output_hidden_states=hidden)
        return out.logits, (tuple(out.hidden_states) if hidden else None)

    def _decoder_pass(self, input_ids, position_ids):
        return self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids, cache=None,
                                        use_cache=False).last_hidden_state

    def _run(self, graph, input_ids, cache, position_ids, attention_mask, *extra):
        if isinstance(attention_mask, dict):
            raise CompilationError("compiled passes take one attention mask, not one per layer type")
        batch, width = input_ids.shape
        if position_ids is None:
            past = cache.get_seq_length()
            position_ids = torch.arange(past, past + width, device=input_ids.device).unsqueeze(0).expand(batch, -1)
        for dim, size in enumerate((batch, width)):  # sizes other than 1 share one graph
            if size > 1:
                torch._dynamo.mark_dynamic(input_ids, dim)
                torch._dynamo.mark_dynamic(position_ids, dim)
        _CONTEXT.cache, _CONTEXT.mask = cache, attention_mask
        try:
            return graph(input_ids, position_ids, *extra)
        finally:
            _CONTEXT.cache, _CONTEXT.mask = None, None

    def __call__(self, *, input_ids, cache, use_cache=True, logits_to_keep: int = 0, position_ids=None,
                 attention_mask=None, output_hidden_states: bool = False, **kwargs) -> PassOutput:
        if kwargs.get(attention.PROMPT_PASS):  # a prompt into an empty cache: the eager fused kernel
            out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep,
                             output_hidden_states=output_hidden_states, **kwargs)
            return PassOutput(out.logits, out.hidden_states if output_hidden_states else None)
        logits, hidden = self._run(self._logits, input_ids, cache, position_ids, attention_mask,
                                   bool(output_hidden_states))
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return PassOutput(logits, hidden)

    def get_decoder(self):
        return self._decode

    def _decode(self, *, input_ids, cache, use_cache=True, position_ids=None, attention_mask=None) -> PassOutput:
        return PassOutput(last_hidden_state=self._run(self._decoder, input_ids, cache, position_ids,
                                                      attention_mask))


_PASSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
